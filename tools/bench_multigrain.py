"""MultiGrain on CPU: CIFAR-10 top-1 and Copydays-style copy detection, cells x seeds, mean ± std.

    python tools/make_copydays_like.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz /tmp/cdl
    python tools/bench_multigrain.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz /tmp/cdl \
        --cells 1,1 0.5,3 --seeds 0 1 2 --per-class 300 --epochs 10 --width 16 --jobs 2 --out /tmp/bench_mg

Each (cell λ,p; seed) trains configs/multigrain/cifar10_r18_joint_p3.yaml (ResNet-18, CIFAR stem,
width --width, GeM p, RA N = 3) with model.lam=λ, model.gem_p=p, train.seed = data.seed = seed on the
first --per-class training images of each class through `mhe-scale train` (images decoded once: data.decoded_cache_mb), in its
own process (--jobs at a time, OMP_NUM_THREADS=1 each). Then, in that process:
- top-1 on the test split (first --per-class per class) at 32 px (the training run's own evaluation);
- Copydays-like mAP (all queries / strong only; database = originals + distractors) of the
  L2-normalised embedding at 32 px, BEFORE and AFTER PCA whitening (models/whitening.py) fitted on
  the embeddings of --whiten-per-class training images per class that training did not use (checked:
  no byte-identical image in both); the whitening is folded into the classifier and the fold is checked
  on the test split (top-1 raw vs folded, argmax agreement, printed);
- at --test-side px (test images upscaled, largest side, no crop): p* = the best top-1 of --grid on
  --pstar-per-class held-out training images per class (tasks.multigrain.cross_validate_p, the
  cross-validation of tools/pstar.py), then top-1 and Copydays mAP with the training p and with p*.
Writes OUT/<cell>-seed<s>/bench.json per run, OUT/results.json and OUT/results.md (mean ± std).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/multigrain/cifar10_r18_joint_p3.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument("copydays_like", help="output folder of tools/make_copydays_like.py")
    ap.add_argument("--cells", nargs="+", default=["1,1", "0.5,3"], help="λ,p pairs")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=300, help="training (and top-1 test) images per class")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--whiten-per-class", type=int, default=200, help="held-out training images per class")
    ap.add_argument("--test-side", type=int, default=64, help="larger test resolution for p*")
    ap.add_argument("--grid", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6], help="p* candidates")
    ap.add_argument("--pstar-per-class", type=int, default=50, help="held-out images per class for p*")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--out", default="/tmp/bench_multigrain")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "λ,p,seed": run one cell in this process
    return ap.parse_args(argv)


def run_name(lam: float, p: float, seed: int) -> str:
    return f"lam{lam:g}-p{p:g}-seed{seed}"


def cache_dir(out: Path) -> Path:
    return out / "cache"


# ---------------------------------------------------------------- one run (child process)


def embed_all(model, images: list, batch_size: int = 16):
    """un-normalised embeddings e [N, D] of images (each [3, H, W]), batched by size, in input order."""
    import torch

    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    out = None
    with torch.no_grad():
        for idx in by_size.values():
            for lo in range(0, len(idx), batch_size):
                chunk = idx[lo:lo + batch_size]
                e = model.embed(torch.stack([images[i] for i in chunk])).float()
                out = e.new_empty(len(images), e.shape[1]) if out is None else out
                out[torch.tensor(chunk)] = e
    return out


def embed_grid(model, images: list, ps: list[float], batch_size: int = 16) -> dict:
    """{p: un-normalised GeM_p embeddings [N, D]} from one backbone pass per image (the feature map
    pooled with each p: same as model.embed with GeM's p set to p)."""
    import torch

    from mhe_scale.models.gem import find_gem, gem

    eps = find_gem(model).eps
    by_size: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    out: dict[float, torch.Tensor] = {}
    with torch.no_grad():
        for idx in by_size.values():
            for lo in range(0, len(idx), batch_size):
                chunk = torch.tensor(idx[lo:lo + batch_size])
                fmap = model.backbone.forward_feature_map(torch.stack([images[i] for i in chunk.tolist()]))
                for p in ps:
                    e = gem(fmap, float(p), eps).float()
                    out.setdefault(float(p), e.new_empty(len(images), e.shape[1]))[chunk] = e
    return out


def copydays_maps(sets: dict, refs: list, emb) -> dict[str, float]:
    """mAP of each Copydays set from embeddings emb [len(refs), D] (L2-normalised here)."""
    import torch

    from mhe_scale.eval.retrieval import score

    emb = torch.nn.functional.normalize(emb.float(), dim=1)
    where = {r: i for i, r in enumerate(refs)}
    out = {}
    for name, rset in sets.items():
        db = emb[torch.tensor([where[r] for r in rset.database])]
        qs = emb[torch.tensor([where[r] for r in rset.queries])]
        out[name] = score(rset, qs, db)["mAP"]
    return out


def top1(logits, labels) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def held_out_train(archive: str, out: Path, per_class: int, extra: int):
    """(records, indices): training images ranked per_class .. per_class + extra − 1 in their class."""
    import numpy as np

    from mhe_scale.data.image_archive import archive_records

    records = archive_records(archive, cache_dir(out), "train", limit_per_class=per_class + extra, progress=False)
    used = archive_records(archive, cache_dir(out), "train", limit_per_class=per_class, progress=False)
    rank: dict[int, int] = {}
    keep = []
    for i, label in enumerate(np.asarray(records.labels).tolist()):
        if rank.get(label, 0) >= per_class:
            keep.append(i)
        rank[label] = rank.get(label, 0) + 1
    trained = {hashlib.sha1(used.read(i)).digest() for i in range(len(used))}
    overlap = sum(hashlib.sha1(records.read(i)).digest() in trained for i in keep)
    if overlap:
        raise SystemExit(f"error: {overlap} held-out training images are also training images; the archive's "
                         "per-class order differs between caches (delete OUT/cache)")
    return records, keep


def run_one(args: argparse.Namespace, lam: float, p: float, seed: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from mhe_scale.config import load_config
    from mhe_scale.data.image_archive import archive_records
    from mhe_scale.data.image_dataset import CIFAR10_MEAN, CIFAR10_STD, ImageClassificationDataset
    from mhe_scale.data.image_transforms import Compose, Normalize, ToTensor
    from mhe_scale.eval.retrieval import ResizeLargestSide, copydays, load_image, to_tensor
    from mhe_scale.models.gem import find_gem
    from mhe_scale.models.whitening import Whitening, fold_into_classifier
    from mhe_scale.tasks.multigrain import build_model
    from mhe_scale.train import main as train_main

    torch.set_num_threads(1)
    out = Path(args.out)
    run = out / run_name(lam, p, seed)
    start = time.perf_counter()
    code = train_main([CONFIG, f"data.path={args.archive}", f"data.cache_dir={cache_dir(out)}",
                       f"data.limit_per_class={args.per_class}", f"data.seed={seed}",
                       f"model.width={args.width}", f"model.lam={lam}", f"model.gem_p={p}",
                       f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.seed={seed}",
                       f"optim.lr={args.lr}", "train.num_workers=0", "train.save_every=1000000",
                       "train.log_every=50", "train.eval_batch_size=16", f"train.output_dir={run}"])
    if code != 0:
        raise SystemExit(f"error: training {run.name} failed (exit {code})")
    train_s = time.perf_counter() - start
    t0 = time.perf_counter()
    (res,) = json.loads((run / "results.json").read_text()).values()
    cfg = load_config(run / "config.yaml")
    state = load_file(str(sorted(run.glob("*/checkpoints/step-*/model.safetensors"))[-1]))
    model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
    model.load_state_dict(state)
    model.eval()
    gem = find_gem(model)
    row: dict[str, float] = {"top-1": 100 * res["metrics"]["top1"]}

    def dataset(records, side: int | None, indices=None) -> tuple[list, torch.Tensor]:
        steps = ([ResizeLargestSide(side)] if side else []) + [ToTensor(), Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        data = ImageClassificationDataset(records, Compose(steps))
        idx = range(len(data)) if indices is None else indices
        pairs = [data[i] for i in idx]
        return [x for x, _ in pairs], torch.tensor([y for _, y in pairs])

    def logits(images: list) -> torch.Tensor:
        with torch.no_grad():
            return model.classifier(embed_all(model, images))

    # Copydays-like sets: one database, queries all / strong; every distinct image embedded once per setting
    cd_root, distractors = Path(args.copydays_like, "copydays"), Path(args.copydays_like, "distractors")
    sets = {"all": copydays(cd_root, distractors), "strong": copydays(cd_root, distractors, transforms=["strong"])}
    refs = list(dict.fromkeys(sets["all"].database + sets["all"].queries))
    cd32 = [to_tensor(load_image(r, 32), CIFAR10_MEAN, CIFAR10_STD) for r in refs]
    test_records = archive_records(args.archive, cache_dir(out), "test", limit_per_class=args.per_class,
                                   progress=False)
    held_records, held = held_out_train(args.archive, out, args.per_class, args.whiten_per_class)

    # 32 px, training p: raw vs whitened
    e_cd = embed_all(model, cd32)
    for name, m in copydays_maps(sets, refs, e_cd).items():
        row[f"CD-{name} mAP"] = m
    white_images, _ = dataset(held_records, None, held)
    whitening = Whitening.fit(embed_all(model, white_images))
    with torch.no_grad():
        for name, m in copydays_maps(sets, refs, whitening(e_cd)).items():
            row[f"CD-{name} mAP whitened"] = m
        test32, test_labels = dataset(test_records, None)
        e_test = embed_all(model, test32)
        raw_logits, folded_logits = model.classifier(e_test), fold_into_classifier(model.classifier, whitening)(
            whitening(e_test))
    fold = {"top-1 raw": top1(raw_logits, test_labels), "top-1 folded": top1(folded_logits, test_labels),
            "argmax agreement %": 100.0 * float((raw_logits.argmax(1) == folded_logits.argmax(1)).float().mean()),
            "max |Δlogit|": float((raw_logits - folded_logits).abs().max())}
    print(f"[{run.name}] whitening fold on {len(test_labels)} test images: {json.dumps(fold)}", flush=True)
    row["fold agreement %"] = fold["argmax agreement %"]

    # larger test resolution: p (training) vs p* (best top-1 of the grid on held-out training images,
    # first of ties: the rule of tasks.multigrain.cross_validate_p / tools/pstar.py crossval)
    s = args.test_side
    grid = sorted(set([float(v) for v in args.grid] + [p]))
    per_class_rank: dict[int, int] = {}
    cv_idx = []
    for i in held:
        label = int(held_records.labels[i])
        if per_class_rank.get(label, 0) < args.pstar_per_class:
            cv_idx.append(i)
        per_class_rank[label] = per_class_rank.get(label, 0) + 1
    cv_images, cv_labels = dataset(held_records, s, cv_idx)
    cv_e = embed_grid(model, cv_images, grid)
    with torch.no_grad():
        gem.set_p(p)
        check = model.embed(torch.stack(cv_images[:8]))
        if not torch.allclose(check, cv_e[p][:8], rtol=1e-4, atol=1e-5):
            raise SystemExit("error: embed_grid differs from model.embed; the bench's pooling shortcut is wrong")
        cv = {q: top1(model.classifier(e), cv_labels) for q, e in cv_e.items()}
    p_star = max(grid, key=lambda q: (cv[q], -grid.index(q)))
    row["p*"] = p_star
    test_s, _ = dataset(test_records, s)
    test_e = embed_grid(model, test_s, [p, p_star])
    cd_e = embed_grid(model, [to_tensor(load_image(r, s), CIFAR10_MEAN, CIFAR10_STD) for r in refs], grid)
    by_p = {q: copydays_maps(sets, refs, e) for q, e in cd_e.items()}
    with torch.no_grad():
        for tag, value in (("p", p), ("p*", p_star)):
            row[f"top-1 @{s} ({tag})"] = top1(model.classifier(test_e[value]), test_labels)
            for name, m in by_p[value].items():
                row[f"CD-{name} mAP @{s} ({tag})"] = m
    row["train s"], row["eval s"] = train_s, time.perf_counter() - t0
    result = {"cell": [lam, p], "seed": seed, "row": row, "fold": fold,
              "held-out top-1 by p": {str(k): v for k, v in cv.items()},
              f"CD mAP @{s} by p": {str(k): v for k, v in by_p.items()}}
    (run / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({run.name: row}), flush=True)
    return result


# ---------------------------------------------------------------- driver


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: list[dict]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault(tuple(r["cell"]), []).append(r["row"])
    keys = list(dict.fromkeys(k for rows in cells.values() for row in rows for k in row))
    lines = ["| cell (seeds) | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
    for (lam, p), rows in cells.items():
        label = f"λ = {lam:g}{' (CE only)' if lam == 1 else ' (joint)'}, p = {p:g} ({len(rows)})"
        lines.append(f"| {label} | " + " | ".join(mean_std([row[k] for row in rows if k in row]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.one:
        lam, p, seed = args.one.split(",")
        run_one(args, float(lam), float(p), int(seed))
        return 0
    from mhe_scale.data.image_archive import build_archive_cache

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for limit in (args.per_class, args.per_class + args.whiten_per_class):  # once, before the parallel runs
        build_archive_cache(args.archive, cache_dir(out), limit_per_class=limit, progress=False)
    jobs = [(float(c.split(",")[0]), float(c.split(",")[1]), s) for s in args.seeds for c in args.cells]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch(job: tuple[float, float, int]) -> dict:
        lam, p, seed = job
        log = out / f"{run_name(lam, p, seed)}.log"
        with open(log, "w") as fh:
            code = subprocess.run([sys.executable, str(Path(__file__).resolve()), *passthrough,
                                   "--one", f"{lam},{p},{seed}"], cwd=REPO, env=env, stdout=fh,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"error: run {run_name(lam, p, seed)} failed (exit {code}); see {log}")
        result = json.loads((out / run_name(lam, p, seed) / "bench.json").read_text())
        print(json.dumps({run_name(lam, p, seed): result["row"], "fold": result["fold"]}), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(launch, jobs))
    wall = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"args": vars(args), "wall s": wall, "runs": results}, indent=2))
    md = table(results)
    (out / "results.md").write_text(md + f"\nwall {wall:.0f} s\n")
    print(md + f"\nwall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
