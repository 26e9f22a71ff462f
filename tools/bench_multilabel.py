"""Multi-label heads x losses on the CIFAR-10 mosaics (tools/make_mosaic.py), one table.

    python tools/bench_multilabel.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz OUT [--epochs 1] [key=value ...]

Makes the mosaics under OUT/data (once), then trains configs/multilabel/mosaic_r18.yaml with each of
pooled+BCE, pooled+ASL, ML-Decoder+ASL, ML-Decoder(cosine)+AAM, ML-GCN(cosine)+AAM (same seed,
same data) and prints a markdown table of test mAP, CF1 / OF1 at 0.5 and at thresholds tuned on
the held-out val split, and training seconds. Extra key=value overrides apply to every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

RUNS = {  # name: overrides
    "pooled + BCE": ["model.head=pooled", "loss.name=bce"],
    "pooled + ASL": ["model.head=pooled", "loss.name=asl", "loss.gamma_neg=4", "loss.clip=0.05"],
    "ML-Decoder + ASL": ["model.head=ml_decoder", "loss.name=asl", "loss.gamma_neg=4", "loss.clip=0.05"],
    "ML-Decoder + AAM": ["model.head=ml_decoder", "model.cosine=true", "loss.name=aam", "loss.s=23", "loss.k=0.7"],
    "ML-GCN + AAM": ["model.head=ml_gcn", "model.cosine=true", "loss.name=aam", "loss.s=23", "loss.k=0.7"],
}
COLUMNS = ["mAP", "CF1@0.5", "CF1@tuned", "OF1@0.5", "OF1@tuned"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of the run names")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from make_mosaic import make_mosaics

    from mhe_scale.train import main as train_main

    out = Path(args.out)
    data = out / "data"
    if not (data / "test.json").is_file():
        make_mosaics(args.archive, data)
    rows = []
    for name in args.runs.split(","):
        run_dir = out / name.replace(" + ", "-").replace(" ", "").lower()
        code = train_main([str(REPO / "configs/multilabel/mosaic_r18.yaml"), f"data.train_path={data / 'train.json'}",
                           f"data.val_path={data / 'val.json'}", f"data.test_path={data / 'test.json'}",
                           f"train.epochs={args.epochs}", f"train.output_dir={run_dir}", "train.resume=false",
                           *RUNS[name], *args.overrides])
        if code != 0:
            return code
        (result,) = json.loads((run_dir / "results.json").read_text()).values()
        rows.append((name, result["metrics"], result["costs"]["train s"]))
    lines = ["| head + loss | " + " | ".join(COLUMNS) + " | train s |", "|---" + "|---:" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{100 * m[c]:.2f}" for c in COLUMNS) + f" | {s:.0f} |" for n, m, s in rows]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
