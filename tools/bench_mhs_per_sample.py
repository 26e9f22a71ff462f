#!/usr/bin/env python
"""Peak memory of one MHS per_sample training step (forward + backward), before / after the fix of
heads/mhs.py per_row_group_logits.

    python tools/bench_mhs_per_sample.py --classes 200000 --dim 256 --batch 256 --groups 16

"per-row gather" is the pre-fix path (each row's M * c_2 weight rows gathered into [B, M * c_2, D],
then bmm; patched in here as the reference); "union + chunks" is the library's path (the union of
the sampled groups read once, scored per row in chunks). Each (path, update) runs in a fresh
subprocess; peak = the process's peak RSS minus its RSS after the head was built (so the weight
itself is not counted); time = median of --steps steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("per-row gather", "union + chunks")


def rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_row_gather(weight, bias, features, groups, margin, cols):  # type: ignore[no-untyped-def]
    """The pre-fix per_row_group_logits: a [B, M * c_2, D] gather of weight rows per row, then bmm."""
    import torch.nn.functional as F
    import torch

    from mhe_scale.heads.base import upcast
    from mhe_scale.heads.mhs import finish_logits, group_codes
    from mhe_scale.optim.rows import gather_rows

    codes = group_codes(groups, weight.shape[1])
    rows = upcast(gather_rows(weight, codes, row_ndim=2))
    feats = upcast(features)
    if margin is not None:
        rows, feats = F.normalize(rows, dim=2), F.normalize(feats, dim=1)
    logits = torch.bmm(rows, feats.unsqueeze(2)).squeeze(2)
    if margin is not None:
        return finish_logits(logits, margin, cols)
    return logits if bias is None else logits + upcast(gather_rows(bias, codes, row_ndim=2))


def child(path: str, update: str, classes: int, dim: int, batch: int, groups: int, steps: int) -> dict:
    import torch

    import mhe_scale.heads.mhs as mhs_module
    from mhe_scale.heads.mhs import MultiHeadSamplingHead

    torch.manual_seed(0)
    if path == PATHS[0]:
        mhs_module.per_row_group_logits = per_row_gather
    head = MultiHeadSamplingHead(dim, classes, mode="per_sample", num_sampled_groups=groups)
    if update == "sparse":
        head.row_sparse_parameters()
    features = torch.randn(batch, dim, requires_grad=True)
    targets = torch.randint(0, classes, (batch,))
    base = rss_bytes()
    times = []
    for _ in range(steps + 1):
        head.weight.grad = None
        start = time.perf_counter()
        head(features, targets).loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": path, "update": update, "sizes": head.sizes, "peak_gb": peak / 2**30,
            "step_ms": 1000 * statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--groups", type=int, default=16, help="M sampled groups per row")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.classes, args.dim, args.batch, args.groups,
                               args.steps)))
        return
    print("| path | update | sizes | step (ms) | peak over weights |\n|---|---|---|---:|---:|")
    for path in PATHS:
        for update in ("dense", "sparse"):
            cmd = [sys.executable, __file__, "--classes", str(args.classes), "--dim", str(args.dim), "--batch",
                   str(args.batch), "--groups", str(args.groups), "--steps", str(args.steps), "--child", path, update]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {path} | {update} | {r['sizes']} | {r['step_ms']:,.0f} | {r['peak_gb']:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
