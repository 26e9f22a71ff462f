#!/usr/bin/env python
"""fc / mhp / mhc / mhs heads side by side on CIFAR-10 through the real `classify` task, same budget.

    python tools/bench_classify.py --archive ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz \
        --epochs 3 --limit-per-class 500 --width 16 --seeds 0 1 2 --json /tmp/bench_classify.json

Every (head, seed) is one call of `mhe_scale.train.main` on configs/classify/cifar10_r18_mhp.yaml with
overrides (head, data.limit_per_class, model.width, train.epochs, train.seed, train.output_dir under a
temporary folder; no checkpoints) and its results.json is read back, so what is measured is the task
itself. For one seed every head starts from the same backbone initialisation and reads the same batches
with the same augmentation (train.seed, data.seed); seeds change both. data.limit_per_class keeps the first
N images of each class of BOTH splits (the test set is the first min(N, 1000) per class). Prints top-1 /
top-5 (mean ± sample std over seeds, percent), training seconds and head parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "classify" / "cifar10_r18_mhp.yaml"
HEADS = {"fc": "head={name:fc}", "mhp": "head={name:mhp,sizes:[5,2]}",
         "mhc": "head={name:mhc,num_groups:5}", "mhs": "head={name:mhs,sizes:[5,2]}"}
"""The compared heads on CIFAR-10 (10 classes): the MHE paper's [5, 2] split; mhc with 5 groups of 2."""
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 jpeg .tar.gz")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="RecordIO cache of the archive (default: a folder in the temporary run folder)")
    parser.add_argument("--epochs", type=float, default=3.0, help="train.epochs of every run")
    parser.add_argument("--limit-per-class", type=int, default=500, help="data.limit_per_class (train and test)")
    parser.add_argument("--width", type=int, default=16, help="model.width: base channels of the ResNet-18")
    parser.add_argument("--batch-size", type=int, default=128, help="train.batch_size")
    parser.add_argument("--lr", type=float, default=0.1, help="optim.lr (SGD, cosine schedule of the config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--threads", type=int, default=None, help="train.threads (torch CPU threads)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run, e.g. --set train.warmup_steps=10")
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    args = parser.parse_args(argv)
    if args.epochs <= 0 or args.limit_per_class < 1 or args.width < 1 or args.batch_size < 1:
        parser.error("--epochs, --limit-per-class, --width and --batch-size must be positive")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {args.seeds} repeats a seed")
    return args


def run_overrides(args: argparse.Namespace, head: str, seed: int, out: Path, cache: Path) -> list[str]:
    """The dotted overrides of one (head, seed) run."""
    threads = [f"train.threads={args.threads}"] if args.threads else []
    return [HEADS[head], f"data.path={args.archive}", f"data.cache_dir={cache}",
            f"data.limit_per_class={args.limit_per_class}", f"model.width={args.width}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"optim.lr={args.lr}",
            f"train.seed={seed}", f"train.output_dir={out}", "train.save_every=0", "train.eval_every=0",
            "train.num_workers=0", "train.log_every=1000000", "train.resume=false", *threads, *args.overrides]


def run_one(args: argparse.Namespace, head: str, seed: int, root: Path, cache: Path) -> dict[str, Any]:
    """Train one head with one seed through mhe_scale.train.main -> {top1, top5, train s, head params, wall s}."""
    from mhe_scale.train import main as train_main

    out = root / f"{head}-seed{seed}"
    start = time.perf_counter()
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if args.quiet else contextlib.nullcontext():
        code = train_main([str(CONFIG), *run_overrides(args, head, seed, out, cache)])
    if code != 0:
        raise SystemExit(f"error: run {head} seed {seed} failed (exit {code}); see the message above")
    (result,) = json.loads((out / "results.json").read_text()).values()
    m, c = result["metrics"], result["costs"]
    return {"top1": m["top1"], "top5": m["top5"], "train s": c["train s"],
            "head params": round(c["head params (K)"] * 1e3), "wall s": time.perf_counter() - start}


def summarise(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed rows -> mean and sample std (0 for one seed) of each number, plus the rows themselves."""
    row: dict[str, Any] = {}
    for key in ("top1", "top5", "train s", "wall s"):
        values = [r[key] for r in runs.values()]
        row[key] = statistics.fmean(values)
        row[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["head params"] = next(iter(runs.values()))["head params"]
    row["per seed"] = {str(seed): r for seed, r in runs.items()}
    return row


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| head | top-1 % | top-5 % | train s / run | head params |", "|---|---:|---:|---:|---:|"]
    for head, r in results.items():
        lines.append(f"| {head} | {100 * r['top1']:.2f} ± {100 * r['top1 std']:.2f} | "
                     f"{100 * r['top5']:.2f} ± {100 * r['top5 std']:.2f} | {r['train s']:.1f} ± {r['train s std']:.1f} | "
                     f"{r['head params']:,} |")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """All heads x seeds (seed-major, so drift in machine load spreads over the heads) -> results dict."""
    per_head: dict[str, dict[int, dict[str, Any]]] = {h: {} for h in args.heads}
    with tempfile.TemporaryDirectory(prefix="bench_classify_") as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        for seed in args.seeds:
            for head in args.heads:
                per_head[head][seed] = r = run_one(args, head, seed, Path(tmp), cache)
                print(f"  {head} seed {seed}: top-1 {100 * r['top1']:.2f}  top-5 {100 * r['top5']:.2f}  "
                      f"train {r['train s']:.1f}s  (run {r['wall s']:.1f}s)", flush=True)
    return {"heads": {h: summarise(runs) for h, runs in per_head.items()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.archive.is_file():
        print(f"error: --archive {args.archive} is not a file; pass the CIFAR-10 jpeg .tar.gz", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_benchmark(args)
    results["wall s"] = time.perf_counter() - start
    print(f"\n{markdown(results['heads'])}\n\n(total {results['wall s']:.0f}s wall; {len(args.seeds)} seed(s) "
          f"{args.seeds}; {args.epochs:g} epoch(s) over {args.limit_per_class} images/class; ResNet-18 width {args.width})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
