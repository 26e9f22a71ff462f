"""Predicted vs measured peak memory per rank (CPU, gloo) for the planner's memory model.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_plan_memory.py --classes 10000 100000 1000000 \
        --cache /tmp/plan_bench.jsonl --out /tmp/plan_bench.md

Runs the synthetic demo (configs/demo/mhp_synthetic.yaml, a 0.36M-parameter MLP encoder, D = 128, AdamW)
through the real engine (mhe_scale.plan.probe_run, 1 or 2 processes under torchrun on gloo) for 3 steps per
case, each in a fresh process tree, with glibc's mmap threshold fixed at 1 MiB (MALLOC_ENV); peak RSS of the
largest rank from the start of fit (mhe_scale.plan.probe_run: the data set-up is not in it). The matrix (cases()):
  fit      per C: mhp, ZeRO-2, fp32, b = 64 and 256, at 1 and at 2 processes (at 100K also bf16): the
           activation lines per (precision, world), fitted per C; their base holds the per-process fixed
           cost (libraries, what the synthetic data of that C keeps) and, at W = 2, the process group's
           per-rank cost (printed: base(2) - base(1), the "process group" term)
  heads    every head x C at one setting: 2 processes, ZeRO-2, fp32, b = 64, class-sharded where the head can
           be (fc, partial_fc at 0.1, mhs, mhc: row-sparse updates, as optim.head_update=auto does); mhp replicated
  settings at C = 100K on fc / partial_fc / mhc / mhs (sharded): no DeepSpeed and ZeRO-0/1/2/3, fp32 and bf16,
           b = 64 and 256, 1 process (head replicated) and 2; at 1M three fp32 rows (fc b = 256, partial_fc
           ZeRO-3, mhc ZeRO-0 b = 256)
Every row that is not a fit row is a prediction. A case whose predicted total (per rank x ranks) is over 4 GB
runs under the shared lock /work/briefs/bigmem.lock (as `flock`), after MemAvailable is checked.
Results are appended to --cache (JSON lines) so the matrix can run in parts; the table is built from the cache.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mhe_scale.config import load_config  # noqa: E402
from mhe_scale.plan.candidates import PlanContext, Setup, breakdown  # noqa: E402
from mhe_scale.plan.memory import GiB, HeadSpec, MiB  # noqa: E402
from mhe_scale.plan.probe import (ProbeResult, fit_and_predict, fit_lines, process_group_cost,  # noqa: E402
                                  run_probe)
from mhe_scale.plan.shapes import backbone_shape, meta_activation_line  # noqa: E402
from mhe_scale.plan.writer import write_setup  # noqa: E402

CONFIG = str(ROOT / "configs" / "demo" / "mhp_synthetic.yaml")
STEPS = 3
LOCK = "/work/briefs/bigmem.lock"
BIG = 4 * GiB
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""A fixed glibc mmap threshold: every block of 1 MiB or more is its own mapping, returned to the OS when
freed, so RSS follows the live tensors (with the default dynamic threshold, blocks up to 32 MiB freed by the
data set-up stay in the heap and the peak wanders by ~100 MiB between runs of one case)."""
SHARDED = {"fc": {"sharded": True}, "partial_fc": {"sharded": True, "sample_rate": 0.1},
           "mhs": {"sharded": True, "mode": "batch_union", "num_sampled_groups": 1}, "mhc": {"sharded": True},
           "mhp": {}}
Case = tuple[str, str, int, int, Optional[int], str, int]
"""(part, head, C, world, ZeRO stage or None, precision, micro-batch)"""


def cases(classes: list[int]) -> list[Case]:
    out: list[Case] = []
    for c in classes:
        out += [("fit", "mhp", c, w, 2, "fp32", b) for w in (1, 2) for b in (64, 256)]
        if c == 100_000:
            out += [("fit", "mhp", c, w, 2, "bf16", b) for w in (1, 2) for b in (64, 256)]
        out += [("heads", h, c, 2, 2, "fp32", 64) for h in ("fc", "partial_fc", "mhs", "mhc")]
        if c == 100_000:
            out += [("settings", "fc", c, 2, z, "fp32", 64) for z in (None, 0, 1, 3)]
            out += [("settings", "fc", c, 2, z, "bf16", 64) for z in (None, 0, 1, 2, 3)]
            out += [("settings", "fc", c, 2, 2, "fp32", 256), ("settings", "fc", c, 1, 2, "fp32", 64),
                    ("settings", "fc", c, 1, None, "fp32", 64), ("settings", "fc", c, 1, 1, "bf16", 64)]
            out += [("settings", "partial_fc", c, 2, z, p, 64) for z, p in ((None, "fp32"), (3, "fp32"), (2, "bf16"))]
            out += [("settings", "partial_fc", c, 2, 2, "fp32", 256)]
            out += [("settings", "mhc", c, 2, 1, "fp32", 64), ("settings", "mhc", c, 2, 2, "bf16", 64),
                    ("settings", "mhs", c, 2, 3, "bf16", 64), ("settings", "mhs", c, 2, 0, "fp32", 256)]
        if c == 1_000_000:  # the class-sized terms at their largest: b = 256 logits, ZeRO-3 and ZeRO-0 beside them
            out += [("settings", "fc", c, 2, 2, "fp32", 256), ("settings", "partial_fc", c, 2, 3, "fp32", 64),
                    ("settings", "mhc", c, 2, 0, "fp32", 256)]
    return out


def head_spec(name: str, classes: int, dim: int, world: int) -> HeadSpec:
    """The head as the run builds it: sharded (and row-sparse for partial_fc/mhs/mhc) only when world > 1."""
    from mhe_scale.labels.codec import factorize

    fields = dict(SHARDED[name]) if world > 1 else {k: v for k, v in SHARDED[name].items() if k != "sharded"}
    sizes = tuple(factorize(classes, 2)) if name in ("mhp", "mhs", "mhc") else None
    sparse = bool(fields.get("sharded")) and name in ("partial_fc", "mhs", "mhc")
    return HeadSpec(name, classes, dim, sizes=sizes, row_sparse=sparse, **fields)


def setup_of(case: Case, dim: int) -> Setup:
    _, name, c, world, stage, prec, b = case
    return Setup(world, b, 1, stage, False, False, prec, False, head_spec(name, c, dim, world), name)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def big_memory(total: float) -> Iterator[None]:
    """Hold the shared flock (the `flock` utility's lock) while a case predicted over 4 GB runs."""
    if total <= BIG:
        yield
        return
    with open(LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            while mem_available() < 1.5 * total:
                print(f"waiting: MemAvailable {mem_available() / GiB:.1f} GiB < 1.5 x {total / GiB:.1f} GiB",
                      flush=True)
                time.sleep(20)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def key(case: Case) -> str:
    return json.dumps(list(case))


def run_case(case: Case, ctx: PlanContext, dim: int, timeout: int, idx: int) -> ProbeResult:
    _, name, c, world, stage, prec, b = case
    base_overrides = [f"data.num_classes={c}", "train.threads=1", "optim.name=adamw"]
    setup = setup_of(case, dim)
    files = write_setup(setup, replace(setup, head_label=""), f"/tmp/plan_bench/{idx}", CONFIG, base_overrides, 0.0,
                        None, world, 1, False)
    overrides = files.override_list + ["eval.baseline=null", f"data.num_train={setup.global_batch * STEPS}",
                                       f"data.num_test={8 * world}", "train.epochs=1"]
    total = world * breakdown(setup, ctx).device
    with big_memory(total):
        return run_probe(setup, CONFIG, overrides, timeout, env=dict(os.environ, **MALLOC_ENV))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--parts", nargs="+", default=["fit", "heads", "settings"])
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--cache", default="/tmp/plan_bench.jsonl",
                   help="results, appended; cases found there are not rerun")
    p.add_argument("--table-only", action="store_true", help="build the table from --cache without running")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = load_config(CONFIG, ["data.num_classes=10000", "optim.name=adamw"])
    shape = backbone_shape(cfg)
    ctx = PlanContext(shape.params, shape.largest_layer,
                      {(pr, False): meta_activation_line(cfg, pr) for pr in ("fp32", "bf16")}, device="cpu",
                      saves_checkpoints=False)  # train.save_every=0
    cache = Path(args.cache)
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            rec = json.loads(line)
            done[rec["case"]] = rec
    todo = [c for c in cases(args.classes) if c[0] in args.parts]
    start = time.perf_counter()
    for i, case in enumerate(todo):
        if args.table_only or key(case) in done:
            continue
        r = run_case(case, ctx, shape.dim, args.timeout, i)
        rec = {"case": key(case), "status": r.status, "peak": r.peak, "detail": r.detail}
        done[key(case)] = rec
        with cache.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"[{time.perf_counter() - start:.0f}s] {case}: {r.status} {(r.peak or 0) / MiB:.1f} MiB {r.detail}",
              flush=True)
    lines = ["| part | head | C | processes | ZeRO | precision | micro-batch | predicted MiB | measured MiB | error "
             "| |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    n_ok = n_pred = 0
    for c in args.classes:  # one fit per C: lines do not carry between C (the synthetic data's size is in the base)
        group = [case for case in todo if case[2] == c and key(case) in done]
        rows = [ProbeResult(setup_of(case, shape.dim), done[key(case)]["status"], done[key(case)]["peak"],
                            detail=done[key(case)]["detail"]) for case in group]
        if not rows:
            continue
        lines_c, _ = fit_lines(rows, ctx)
        for k in sorted(lines_c):
            pg = process_group_cost(lines_c, k)
            print(f"C={c:,} line {k}: {lines_c[k].base / MiB:.1f} MiB + {lines_c[k].per_sample / 1024:.1f} KiB * b"
                  + (f"; process group base(W)-base(1) = {pg / MiB:.1f} MiB" if pg is not None and k[2] > 1 else ""))
        for case, r in zip(group, fit_and_predict(rows, ctx)):
            s = r.setup
            zero = "none" if s.zero_stage is None else str(s.zero_stage)
            head = s.head.name + (" (sharded)" if s.head.sharded else "")
            cells = f"| {case[0]} | {head} | {c:,} | {s.world} | {zero} | {s.precision} | {s.micro_batch} | "
            if r.status != "ok" or r.peak is None:
                lines.append(cells + f"{r.predicted / MiB:.0f} | {r.status} | | |")
                continue
            err = (r.predicted - r.peak) / r.peak * 100
            ok = abs(r.predicted - r.peak) <= max(0.15 * r.peak, 64 * MiB)
            if not r.fitted_on:
                n_pred += 1
                n_ok += ok
            lines.append(cells + f"{r.predicted / MiB:.0f} | {r.peak / MiB:.0f} | {err:+.1f}% | "
                         f"{'fit' if r.fitted_on else ('ok' if ok else 'OVER')} |")
    table = "\n".join(lines) + f"\n\n{n_ok} of {n_pred} predicted rows within max(15%, 64 MiB).\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
