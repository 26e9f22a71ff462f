#!/usr/bin/env python
"""One SGD step (momentum 0.9, wd 5e-4) of the sampled heads with the dense and the row-sparse update.

    python tools/bench_sparse_heads.py --classes 100000 1000000 --dim 512 --batch 256

Rows: full FC (dense), Partial FC r=0.1 dense / sparse, MHS batch_union with many small groups
(c_2 = --group-size members, M = --groups sampled groups) dense / sparse, MHP H=2 (dense: no O(C)
parameter). "sparse" = optim.head_update=sparse: the sampled rows are gathered into a leaf (no
[C, D] gradient) and mhe_scale.optim.RowSparseSGD updates only them (lazy exact catch-up).
`--world 2`: the class-sharded heads (ShardedPartialFCHead / ShardedMultiHeadSamplingHead) on 2 gloo
processes with the same global batch; per-rank numbers are the largest over ranks.
"forward + backward" is the part of the step before the optimizer (W = 1 rows; with the sparse
update it includes gathering and catching up the sampled rows): what the sampled softmax costs.
Each (row, C, W) runs in a fresh subprocess: step time = median over --steps steps after one warm-up
step; peak = RSS growth over the process's RSS before the head is built; state = weights +
optimizer state (+ per-row counters) held by the (single) rank; softmax = columns per training row.
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

ROWS = ("fc", "partial_fc dense", "partial_fc sparse", "mhs dense", "mhs sparse", "mhp")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def estimate_gb(row: str, classes: int, dim: int, batch: int) -> float:
    """Rough peak: weight (+ grad + momentum when dense), plus B x C logits for fc."""
    if row == "mhp":
        return 0.1
    tensors = 2 if row.endswith("sparse") else 3
    logits = 3 * batch * classes * 4 if row == "fc" else 0
    return (tensors * classes * dim * 4 + logits) / 1e9


def build(row: str, classes: int, dim: int, args: argparse.Namespace):
    from mhe_scale.heads import create_head

    if row == "fc":
        return create_head("fc", in_features=dim, num_classes=classes, cosine=True, margin=(1.0, 0.5, 0.0))
    if row.startswith("partial_fc"):
        return create_head("partial_fc", in_features=dim, num_classes=classes, sample_rate=0.1)
    if row.startswith("mhs"):
        sizes = [-(-classes // args.group_size), args.group_size]
        return create_head("mhs", in_features=dim, num_classes=classes, sizes=sizes, mode="batch_union",
                           num_sampled_groups=args.groups, cosine=True, margin=(1.0, 0.5, 0.0))
    return create_head("mhp", in_features=dim, num_classes=classes, num_heads=2)


def head_optimizer(row: str, head):
    """SGD momentum 0.9, wd 5e-4: row-sparse for the "... sparse" rows, torch's dense SGD otherwise."""
    import torch

    from mhe_scale.optim import RowSparseSGD

    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    if row.endswith("sparse"):
        head.row_sparse_parameters()
        return RowSparseSGD(head.parameters(), **hyper)
    return torch.optim.SGD(head.parameters(), **hyper)


def state_bytes(head, optimizer) -> int:
    """Parameter bytes + optimizer state tensors (momentum, per-row counters) of one rank."""
    return optimizer_state_bytes(optimizer) + sum(p.numel() * p.element_size() for p in head.parameters())


def build_sharded(row: str, classes: int, dim: int, args: argparse.Namespace, group):
    """The class-sharded head of a row (W ranks each hold C / W classes or groups)."""
    from mhe_scale.parallel import ShardedMultiHeadSamplingHead, ShardedPartialFCHead

    if row.startswith("partial_fc"):
        return ShardedPartialFCHead(dim, classes, sample_rate=0.1, group=group)
    if row.startswith("mhs"):
        return ShardedMultiHeadSamplingHead(dim, classes, sizes=[-(-classes // args.group_size), args.group_size],
                                            mode="batch_union", num_sampled_groups=args.groups, cosine=True,
                                            margin=(1.0, 0.5, 0.0), group=group)
    raise ValueError(f"row {row!r} has no sharded form in this benchmark (partial_fc / mhs only)")


def rank_step(group, row: str, classes: int, args: argparse.Namespace) -> dict:
    """Runs on every rank of a W-process gloo group: the sharded head's step; the slowest rank's time."""
    import torch

    from mhe_scale.parallel import all_reduce_sum, get_rank, get_world_size

    world = get_world_size(group)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(get_rank(group))
    per_rank = args.batch // world  # the same global batch as the W = 1 row
    features = torch.randn(per_rank, args.dim, generator=g).requires_grad_()
    labels = torch.randint(0, classes, (per_rank,), generator=g)
    base_rss = rss_bytes()
    head = build_sharded(row, classes, args.dim, args, group)
    optimizer = head_optimizer(row, head)
    # barrier before and after: the step ends when the slowest rank is done
    times, _, out = timed_steps(head, optimizer, features, labels, args.steps,
                                sync=lambda: all_reduce_sum(torch.zeros(1), group))
    metric = out.metrics.get("softmax_columns", out.metrics.get("kept_classes"))
    params_and_state = state_bytes(head, optimizer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"median_s": statistics.median(times), "state_bytes": params_and_state, "peak_bytes": max(peak, 0),
            "softmax": float(metric) if metric is not None else float("nan"), "sizes": getattr(head, "sizes", None),
            "device": f"cpu x{torch.get_num_threads()} per rank"}


def run_sharded(row: str, classes: int, world: int, args: argparse.Namespace) -> dict:
    """W gloo processes; per-rank numbers are the largest over ranks (softmax: rank 0's local columns)."""
    from mhe_scale.parallel.testing import run_in_processes

    ranks = run_in_processes(rank_step, world, row, classes, args, timeout_s=3600.0)
    return {"row": row, "classes": classes, "world": world, "sizes": ranks[0]["sizes"],
            "median_s": max(r["median_s"] for r in ranks), "state_bytes": max(r["state_bytes"] for r in ranks),
            "peak_bytes": max(r["peak_bytes"] for r in ranks), "softmax": ranks[0]["softmax"],
            "device": ranks[0]["device"]}


def run_one(row: str, classes: int, args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    features = torch.randn(args.batch, args.dim, requires_grad=True)
    labels = torch.randint(0, classes, (args.batch,))
    base_rss = rss_bytes()
    head = build(row, classes, args.dim, args)
    optimizer = head_optimizer(row, head)
    times, passes, out = timed_steps(head, optimizer, features, labels, args.steps)
    if args.profile:  # one more step under torch.profiler: where the step's time goes, by operator
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            timed_steps(head, optimizer, features, labels, 0)
        print(f"{row} C={classes:,}: one step by operator\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile), file=sys.stderr)
    metric = out.metrics.get("softmax_columns", out.metrics.get("kept_classes"))
    width = float(metric) if metric is not None else float(classes if row == "fc" else sum(head.sizes))
    params_and_state = state_bytes(head, optimizer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"row": row, "classes": classes, "sizes": getattr(head, "sizes", None), "median_s": statistics.median(times),
            "pass_s": statistics.median(passes),
            "state_bytes": params_and_state, "peak_bytes": max(peak, 0), "softmax": width,
            "device": f"cpu x{torch.get_num_threads()}"}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    device = next((r["device"] for r in rows if "device" in r), "?")
    lines = [f"One training step (forward + backward + SGD momentum 0.9, wd 5e-4), D={args.dim}, batch {args.batch}, "
             f"median of {args.steps}; {device}; {platform.machine()}. MHS: batch_union, c_2={args.group_size}, "
             f"M={args.groups}.", "",
             "| C | W | head | update | softmax cols | forward + backward (ms) | step (ms) | dense/sparse | "
             "params + state / rank | peak memory / rank |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for classes in args.classes:
        for r in (r for r in rows if r["classes"] == classes):
            name, _, update = r["row"].partition(" ")
            world = r.get("world", 1)
            if "skipped" in r:
                lines.append(f"| {classes:,} | {world} | {name} | {update or 'dense'} | | | skipped: {r['skipped']} | | | |")
                continue
            dense = next((d for d in rows if d["row"] == f"{name} dense" and d["classes"] == classes
                          and d.get("world", 1) == world and "median_s" in d), None)
            ratio = f"{dense['median_s'] / r['median_s']:.1f}x" if update == "sparse" and dense else ""
            sizes = f" {r['sizes']}" if r.get("sizes") else ""
            forward_backward = f"{r['pass_s'] * 1e3:.1f}" if "pass_s" in r else "-"
            lines.append(f"| {classes:,} | {world} | {name}{sizes} | {update or 'dense'} | {r['softmax']:,.0f} | "
                         f"{forward_backward} | "
                         f"{r['median_s'] * 1e3:.1f} | {ratio} | {fmt_bytes(r['state_bytes'])} | "
                         f"{fmt_bytes(r['peak_bytes'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"subset of {list(ROWS)}")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32, help="MHS members per group c_2")
    parser.add_argument("--groups", type=int, default=512, help="MHS sampled groups M (batch_union minimum)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-gb", type=float, default=None, help="skip rows estimated above this "
                        "(default: 60%% of MemAvailable)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    parser.add_argument("--world", type=int, nargs="+", default=[1], help="W = 1: the single-process heads; "
                        "W > 1: the class-sharded heads on W gloo processes (same global batch, cores // W threads "
                        "each); partial_fc and mhs rows only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="W = 1 rows: print torch.profiler's N costliest operators of one more step")
    parser.add_argument("--one", nargs=3, metavar=("ROW", "C", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row, classes, world = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(row, classes, args) if world == 1 else run_sharded(row, classes, world, args)))
        return
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.max_gb is None:
        args.max_gb = available_gb(0.6)
    rows = []
    for classes, world, row in ((c, w, r) for c in args.classes for w in args.world for r in args.rows):
        if world > 1 and not row.startswith(("partial_fc", "mhs")):
            continue
        need = estimate_gb(row, classes, args.dim, args.batch) / world
        if need > args.max_gb:
            print(f"skip {row} C={classes:,}: needs ~{need:.1f} GB > --max-gb {args.max_gb:.1f}", file=sys.stderr)
            rows.append({"row": row, "classes": classes, "world": world, "skipped": f"~{need:.0f} GB needed"})
            continue
        cmd = [sys.executable, __file__, "--one", row, str(classes), str(world), "--dim", str(args.dim), "--batch",
               str(args.batch), "--steps", str(args.steps), "--group-size", str(args.group_size), "--groups",
               str(args.groups), "--profile", str(args.profile)] + (["--threads", str(args.threads)] if args.threads else [])
        result = run_isolated(cmd, echo_stderr=bool(args.profile))
        if result is None:
            rows.append({"row": row, "classes": classes, "world": world, "skipped": "failed (see stderr)"})
            continue
        rows.append(result)
        print(f"{row:18s} C={classes:>9,} W={world}  step {result['median_s'] * 1e3:9.1f} ms  state "
              f"{fmt_bytes(result['state_bytes']):>9s}  peak {fmt_bytes(result['peak_bytes']):>9s}", file=sys.stderr)
    emit_table(render(rows, args), args.out)


if __name__ == "__main__":
    main()
