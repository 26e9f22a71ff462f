#!/usr/bin/env python
"""Per-rank memory and step time of the class-sharded fc and MHS heads for several world sizes.

    python tools/bench_sharded_heads.py --classes 1000000 --world 1 2 4 --dim 512 --batch 256

For each W, W gloo CPU processes (mhe_scale.parallel.testing.run_in_processes) each build the
sharded fc head (plain softmax CE) and the sharded MHS head (batch_union, --groups sampled groups),
one after the other, with torch.optim.Adam, and time forward + backward + Adam step on --batch
rows per rank (the global batch is W x --batch), median of --steps after one warm-up, between
barriers (so the time is the slowest rank's). Reported per rank: the head's parameter bytes and
Adam state bytes (exp_avg + exp_avg_sq, counted from the tensors: exact), their sum, and the
process's peak RSS (whole process: torch, both heads one after the other, gradients, logits).
gloo on CPU shows the memory scaling faithfully; its step times are NOT GPU / NCCL speeds (the W
processes share this machine's cores: --threads per rank, default cores // W).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mhe_scale.parallel import (ShardedFullyConnectedHead, ShardedMultiHeadSamplingHead, all_reduce_sum,  # noqa: E402
                                get_rank)
from mhe_scale.parallel.testing import run_in_processes  # noqa: E402
from bench_common import optimizer_state_bytes, timed_steps  # noqa: E402

HEADS = ("fc", "mhs")


def build(name: str, classes: int, dim: int, groups: int, group) -> torch.nn.Module:
    if name == "fc":
        return ShardedFullyConnectedHead(dim, classes, group=group)
    return ShardedMultiHeadSamplingHead(dim, classes, mode="batch_union", num_sampled_groups=groups, group=group)


def bench_rank(group, classes: int, dim: int, batch: int, steps: int, groups: int, threads: int,
               heads: tuple[str, ...]) -> dict:
    """Runs on every rank: both heads in turn; returns this rank's numbers."""
    torch.set_num_threads(threads)
    rank = get_rank(group)
    g = torch.Generator().manual_seed(rank)
    out: dict = {"rank": rank}
    for name in heads:
        head = build(name, classes, dim, groups, group)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        features = torch.randn(batch, dim, generator=g).requires_grad_()
        labels = torch.randint(0, classes, (batch,), generator=g)
        times, _, _ = timed_steps(head, opt, features, labels, steps,  # barriers: time the slowest rank
                                  sync=lambda: all_reduce_sum(torch.zeros(1), group))
        params = sum(p.numel() * p.element_size() for p in head.parameters())
        adam = optimizer_state_bytes(opt)
        out[name] = {"median_s": statistics.median(times), "param_bytes": params, "adam_bytes": adam,
                     "shard": head.plan.count, "sizes": getattr(head, "sizes", None)}
        del head, opt
        gc.collect()
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def render(rows: dict[int, list[dict]], args: argparse.Namespace) -> str:
    lines = [f"C={args.classes:,}, D={args.dim}, batch {args.batch} per rank (global W x {args.batch}), fp32, "
             f"Adam; median of {args.steps} steps after one warm-up; gloo on CPU "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores); per-rank numbers are "
             f"the largest over ranks.", "",
             "| W | head | shard / rank | params / rank | Adam state / rank | params + Adam / rank | "
             "step (s) | peak RSS / rank |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for world, ranks in rows.items():
        for name in args.heads:
            worst = max(ranks, key=lambda r: r[name]["param_bytes"])[name]
            label = name + (f" {worst['sizes']} batch_union M={args.groups}" if name == "mhs" else " softmax")
            unit = "groups" if name == "mhs" else "classes"
            lines.append(f"| {world} | {label} | {worst['shard']:,} {unit} | {gib(worst['param_bytes'])} | "
                         f"{gib(worst['adam_bytes'])} | {gib(worst['param_bytes'] + worst['adam_bytes'])} | "
                         f"{max(r[name]['median_s'] for r in ranks):.2f} | "
                         f"{gib(max(r['peak_rss'] for r in ranks))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="rows per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=32, help="MHS num_sampled_groups")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // W)")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    args = parser.parse_args()
    rows = {}
    for world in args.world:
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        started = time.perf_counter()
        rows[world] = run_in_processes(bench_rank, world, args.classes, args.dim, args.batch, args.steps, args.groups,
                                       threads, tuple(args.heads), timeout_s=7200.0)
        print(f"W={world}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(render(rows, args))


if __name__ == "__main__":
    main()
