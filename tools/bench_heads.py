#!/usr/bin/env python
"""One training step (forward, backward, AdamW step) of each head at several label-space sizes.

    python tools/bench_heads.py --classes 10000 100000 1000000 2059906 --dim 512 --batch 256

Every (head, C) runs in a fresh subprocess so peak memory is its own: peak RSS growth over the
process's RSS just before the head is built (CPU), or torch.cuda.max_memory_allocated (GPU).
Times are the median over --steps steps after one warm-up step. The full-FC head is the baseline
of each C; ratios are FC / head. A head whose estimated memory exceeds --max-gb is skipped and
reported as such. Prints a markdown table (and appends it to --out if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (available_gb, emit_table, fmt_bytes, optimizer_state_bytes, run_isolated,  # noqa: E402
                          timed_steps)

HEADS = {  # row name -> (registered head, constructor arguments)
    "fc": ("fc", {}),
    "partial_fc": ("partial_fc", {"sample_rate": 0.1}),
    "mhp": ("mhp", {"num_heads": 2}),
    "mhp3": ("mhp", {"num_heads": 3}),
    "mhc": ("mhc", {"num_heads": 2}),
    "mhs": ("mhs", {"mode": "batch_union", "num_sampled_groups": 32}),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def estimate_gb(head: str, classes: int, dim: int, batch: int) -> float:
    """Rough peak for the O(C) heads: weight + grad + 2 Adam states, plus B x C logits/grads."""
    if HEADS[head][0] in ("fc", "mhs", "partial_fc", "mhc"):
        weights = 4 * classes * dim * 4
        logits = 3 * batch * classes * 4 if head == "fc" else 0
        return (weights + logits) / 1e9
    return 0.1


def run_one(head_name: str, classes: int, dim: int, batch: int, steps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from mhe_scale.heads import create_head

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    features = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)
    base_rss = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    name, kwargs = HEADS[head_name]
    head = create_head(name, in_features=dim, num_classes=classes, **kwargs).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    times, _, out = timed_steps(head, optimizer, features, labels, steps,
                                sync=torch.cuda.synchronize if device.type == "cuda" else None)
    params = sum(p.numel() for p in head.parameters())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_cuda
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"head": head_name, "classes": classes, "sizes": getattr(head, "sizes", None), "median_s": statistics.median(times),
            "params": params, "state_bytes": 4 * params + optimizer_state_bytes(optimizer), "peak_bytes": max(peak, 0),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-gb", type=float, default=None, help="skip heads estimated above this (default: 70%% of MemAvailable)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--one", nargs=2, metavar=("HEAD", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.dim, args.batch, args.steps, args.threads)))
        return
    unknown = sorted(set(args.heads) - set(HEADS))
    if unknown:
        parser.error(f"unknown heads {unknown}; choose from {list(HEADS)}")
    if args.max_gb is None:
        args.max_gb = available_gb(0.7)
    rows = []
    for classes in args.classes:
        for head in args.heads:
            need = estimate_gb(head, classes, args.dim, args.batch)
            if need > args.max_gb:
                print(f"skip {head} C={classes:,}: needs ~{need:.1f} GB > --max-gb {args.max_gb:.1f}", file=sys.stderr)
                rows.append({"head": head, "classes": classes, "skipped": f"~{need:.0f} GB needed"})
                continue
            cmd = [sys.executable, __file__, "--one", head, str(classes), "--dim", str(args.dim),
                   "--batch", str(args.batch), "--steps", str(args.steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            row = run_isolated(cmd)
            if row is None:
                rows.append({"head": head, "classes": classes, "skipped": "failed (see stderr)"})
                continue
            rows.append(row)
            print(f"{head:10s} C={classes:>9,}  step {row['median_s'] * 1e3:9.1f} ms  params+state "
                  f"{fmt_bytes(row['state_bytes']):>9s}  peak {fmt_bytes(row['peak_bytes']):>9s}", file=sys.stderr)
    emit_table(render(rows, args), args.out)


def render(rows: list[dict], args: argparse.Namespace) -> str:
    device = next((r["device"] for r in rows if "device" in r), "?")
    lines = [f"One training step (forward + backward + AdamW), D={args.dim}, batch {args.batch}, median of "
             f"{args.steps}; device: {device}; {platform.processor() or platform.machine()}.", "",
             "| C | head | step (ms) | FC/head time | params + Adam state | FC/head state | peak memory |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for classes in args.classes:
        fc = next((r for r in rows if r["head"] == "fc" and r["classes"] == classes and "median_s" in r), None)
        for r in (r for r in rows if r["classes"] == classes):
            if "skipped" in r:
                lines.append(f"| {classes:,} | {r['head']} | skipped: {r['skipped']} | | | | |")
                continue
            t_ratio = f"{fc['median_s'] / r['median_s']:.1f}x" if fc else "-"
            s_ratio = f"{fc['state_bytes'] / r['state_bytes']:.0f}x" if fc else "-"
            name = r["head"] + (f" {r['sizes']}" if r.get("sizes") else "")
            lines.append(f"| {classes:,} | {name} | {r['median_s'] * 1e3:.1f} | {t_ratio} | "
                         f"{fmt_bytes(r['state_bytes'])} | {s_ratio} | {fmt_bytes(r['peak_bytes'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
