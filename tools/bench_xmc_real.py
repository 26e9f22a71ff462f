#!/usr/bin/env python
"""Full BCE (`fc`, multi-label) against MHE heads (mhp, mhc) on real XC datasets, same encoder and budget.

    python tools/bench_xmc_real.py --data-root ../shared/data --datasets bibtex delicious

Each dataset's settings (encoder, optimiser, epochs, the MHE head's arguments) come from
configs/xmc/<dataset>.yaml; `--set key=value ...` overrides them for every run (e.g.
--set train.epochs=5). Every head starts from the same encoder initialisation and sees the batches in
the same order (train.seed; --seeds repeats the whole comparison and averages). The table gives
P@k and PSP@k in percent (PSP with the dataset config's propensity A, B), training seconds, and the
head's parameter count; a "most frequent" row (every test point gets the k most frequent
training labels) and published numbers (with their sources) are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_FOLDERS = {"bibtex": "mulan-bibtex", "delicious": "mulan-delicious", "medical": "mulan-medical"}
COLUMNS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")

# Reference results on the Extreme Classification Repository's splits of these datasets (same sizes
# as ours), as (method, {metric: percent}, source). Only numbers whose source could be read go here;
# docs/benchmarks.md says what could not be found (no checked PSP@k numbers, no paper tables).
_CRAFTML = "github.com/tomtung/craftml-rs README.md, default settings"
REFERENCES: dict[str, list[tuple[str, dict[str, float], str]]] = {
    "bibtex": [("CRAFTML, Rust reimplementation", {"P@1": 61.47, "P@3": 37.20, "P@5": 27.32}, _CRAFTML)],
    "delicious": [("CRAFTML, Rust reimplementation", {"P@1": 67.78, "P@3": 62.15, "P@5": 57.63}, _CRAFTML)],
}


def head_configs(cfg: Any, names: list[str]) -> list[Any]:
    """The HeadConfig of each name: the dataset config's own head or baseline when it has that
    name, else the head's defaults (mhp: two heads, BCE over the digits' multi-hot)."""
    from mhe_scale.config import HeadConfig, to_object

    own = [to_object(cfg).head] + ([to_object(cfg).eval.baseline] if cfg.eval.baseline is not None else [])
    out = []
    for name in names:
        match = [h for h in own if h.name == name]
        out.append(match[0] if match else HeadConfig(name=name, num_heads=2 if name == "mhp" else None))
    return out


def run_dataset(name: str, data_root: Path, heads: list[str], seeds: list[int], threads: int,
                overrides: list[str], accelerator) -> dict[str, dict[str, Any]]:
    """{head: {"metrics": mean over seeds, "p1_std", "train s", "head params"}} for one dataset."""
    from mhe_scale.config import load_config
    from mhe_scale.heads import list_heads
    from mhe_scale.tasks.xmc import load_xmc, popularity_metrics, train_head

    path = data_root / DATA_FOLDERS[name] / "xc_format"
    # fresh runs only (no resume from, or writing of, checkpoints / loss logs under output_dir)
    fixed = [f"data.path={path}", f"train.threads={threads}", "train.resume=false", "train.loss_log=false",
             "train.save_every=0"]
    cfg = load_config(REPO / "configs" / "xmc" / f"{name}.yaml", [*fixed, *overrides])
    start = time.perf_counter()
    data = load_xmc(cfg.data)
    print(f"## {name}: {len(data.train):,} train / {len(data.test):,} test, F={data.num_features:,}, "
          f"C={data.num_classes:,} (read in {time.perf_counter() - start:.1f}s)", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for head_cfg in head_configs(cfg, heads):
        if head_cfg.name not in list_heads():
            print(f"  skipping {head_cfg.name}: not a registered head here ({list_heads()})", flush=True)
            continue
        runs = []
        for seed in seeds:
            seeded = load_config(REPO / "configs" / "xmc" / f"{name}.yaml", [*fixed, *overrides, f"train.seed={seed}"])
            runs.append(train_head(seeded, head_cfg, data, accelerator))
            m, c = runs[-1]["metrics"], runs[-1]["costs"]
            print(f"  {head_cfg.name} seed {seed}: P@1 {100 * m['P@1']:.2f}  PSP@1 {100 * m['PSP@1']:.2f}  "
                  f"train {c['train s']:.1f}s", flush=True)
        rows[head_cfg.name] = {
            "metrics": {k: statistics.fmean(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]},
            "p1_std": statistics.pstdev(r["metrics"]["P@1"] for r in runs),
            "train s": statistics.fmean(r["costs"]["train s"] for r in runs),
            "head params": round(runs[0]["costs"]["head params (K)"] * 1e3),
            "config": {k: v for k, v in vars(head_cfg).items() if v is not None},
            "per seed": {seed: r["metrics"] | {"train s": r["costs"]["train s"]} for seed, r in zip(seeds, runs)},
        }
    rows["most frequent"] = {"metrics": popularity_metrics(data, list(cfg.eval.ks))}
    return rows


def markdown(results: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> str:
    lines = ["| dataset | head | " + " | ".join(COLUMNS) + " | train s | head params |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 2)]
    for dataset, rows in results.items():
        for head, row in rows.items():
            cells = [f"{100 * row['metrics'][c]:.2f}" for c in COLUMNS]
            if len(seeds) > 1 and "p1_std" in row:
                cells[0] += f" ± {100 * row['p1_std']:.2f}"
            train = f"{row['train s']:.1f}" if "train s" in row else "-"
            params = f"{row['head params']:,}" if "head params" in row else "-"
            lines.append(f"| {dataset} | {head} | " + " | ".join(cells) + f" | {train} | {params} |")
        for method, numbers, source in REFERENCES.get(dataset, []):
            cells = [f"{numbers[c]:.2f}" if c in numbers else "-" for c in COLUMNS]
            lines.append(f"| {dataset} | reference: {method} [{source}] | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding mulan-<dataset>/xc_format/{train,test}.txt")
    parser.add_argument("--datasets", nargs="+", default=["bibtex", "delicious"], choices=sorted(DATA_FOLDERS))
    parser.add_argument("--heads", nargs="+", default=["fc", "mhp", "mhc"], help="registered head names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values to average over")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. --set train.epochs=5 head.top_k_groups=4")
    args = parser.parse_args(argv)
    for name in args.datasets:
        folder = args.data_root / DATA_FOLDERS[name] / "xc_format"
        if not (folder / "train.txt").is_file():
            parser.error(f"{folder}/train.txt not found; pass --data-root pointing at the folder with {DATA_FOLDERS[name]}/")

    import torch
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    start = time.perf_counter()
    results = {name: run_dataset(name, args.data_root, args.heads, args.seeds, args.threads, args.overrides,
                                 accelerator) for name in args.datasets}
    table = markdown(results, args.seeds)
    print(f"\n{table}\n\n(total {time.perf_counter() - start:.0f}s, torch {torch.__version__}, "
          f"{args.threads} thread(s), seeds {args.seeds})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
