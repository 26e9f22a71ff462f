"""MultiGrain on CPU: CIFAR-10 classification and Copydays-style copy detection for (λ, p) cells.

    python tools/make_copydays_like.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz /tmp/cdl
    python tools/bench_multigrain.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz /tmp/cdl \
        --cells 1,1 0.5,3 --per-class 1000 --epochs 3 --width 16 --out /tmp/bench_mg

Each cell trains configs/multigrain/cifar10_r18_joint_p3.yaml (ResNet-18, CIFAR stem, width
--width) with model.lam=λ, model.gem_p=p on --per-class training images per class through
`mhe-scale train`, then reports top-1 on the CIFAR-10 test split and the mAP of the
Copydays-like queries (all, strong only) against originals + distractors, embeddings L2-normalised
at the training size (largest side 32) with p and with p + 1. Writes OUT/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("copydays_like", help="output folder of tools/make_copydays_like.py")
    ap.add_argument("--cells", nargs="+", default=["1,1", "0.5,3"], help="λ,p pairs")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", default="/tmp/bench_multigrain")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    from mhe_scale.config import load_config
    from mhe_scale.data.image_dataset import CIFAR10_MEAN, CIFAR10_STD
    from mhe_scale.eval.retrieval import copydays, evaluate
    from mhe_scale.models.gem import find_gem
    from mhe_scale.tasks.multigrain import build_model
    from mhe_scale.train import main as train_main

    out = Path(args.out)
    cd_root, distractors = Path(args.copydays_like, "copydays"), Path(args.copydays_like, "distractors")
    sets = {"all": copydays(cd_root, distractors), "strong": copydays(cd_root, distractors, transforms=["strong"])}
    rows = {}
    for cell in args.cells:
        lam, p = (float(v) for v in cell.split(","))
        run = out / f"lam{lam:g}-p{p:g}"
        start = time.perf_counter()
        code = train_main(["configs/multigrain/cifar10_r18_joint_p3.yaml", f"data.path={args.archive}",
                           f"data.cache_dir={out / 'cache'}", f"data.limit_per_class={args.per_class}",
                           f"model.width={args.width}", f"model.lam={lam}", f"model.gem_p={p}",
                           f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                           f"optim.lr={args.lr}", "train.num_workers=0", "train.save_every=1000000",
                           "train.log_every=20", "train.eval_batch_size=500", f"train.output_dir={run}"])
        if code != 0:
            raise SystemExit(f"error: training cell {cell} failed (exit {code})")
        train_s = time.perf_counter() - start
        (res,) = json.loads((run / "results.json").read_text()).values()
        cfg = load_config(run / "config.yaml")
        ckpt = sorted(run.glob("*/checkpoints/step-*/model.safetensors"))[-1]
        state = load_file(str(ckpt))
        model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
        model.load_state_dict(state)
        model.eval()
        row = {"top1": 100 * res["metrics"]["top1"], "train s": train_s}
        for test_p, tag in ((p, "p"), (p + 1, "p+1")):
            find_gem(model).set_p(test_p)
            for name, rset in sets.items():
                m = evaluate(rset, model.embed, largest_side=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, batch_size=256)
                row[f"CD-{name} mAP ({tag})"] = m["mAP"]
        rows[f"λ={lam:g}, p={p:g}"] = row
        print(json.dumps({cell: row}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| cell | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in keys) + " |" for c, r in rows.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
