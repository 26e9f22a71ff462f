"""Predicted vs measured peak memory per rank (CPU, gloo) for the planner's memory model.

    PYTHONPATH=. OMP_NUM_THREADS=1 python tools/bench_plan_memory.py --classes 100000 --out /tmp/plan_bench.md

Runs the synthetic demo (configs/demo/mhp_synthetic.yaml, a 0.36M-parameter MLP encoder) through the real
engine (mhe_scale.plan.probe_run, 1 or 2 processes under torchrun, fp32, DeepSpeed ZeRO-0/2/3 or none) for a few
steps per case, each in a fresh process tree; peak RSS per rank from getrusage. The activation line (with the
per-process fixed cost: libraries, data) is fitted on two micro-batches of the mhp head at ZeRO-2 on 1
process; every other row is a prediction. Prints a markdown table with the error of each row.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mhe_scale.config import load_config  # noqa: E402
from mhe_scale.plan.candidates import PlanContext, Setup  # noqa: E402
from mhe_scale.plan.memory import HeadSpec, MiB  # noqa: E402
from mhe_scale.plan.probe import ProbeResult, fit_and_predict, run_probe  # noqa: E402
from mhe_scale.plan.shapes import backbone_shape, meta_activation_line  # noqa: E402
from mhe_scale.plan.writer import write_setup  # noqa: E402

CONFIG = str(ROOT / "configs" / "demo" / "mhp_synthetic.yaml")
STEPS = 3


def cases(c: int) -> list[tuple[str, dict, int, object, int]]:
    """(head, head fields, world, zero stage, micro-batch); the first two are the fit rows."""
    return [("mhp", {}, 1, 2, 64), ("mhp", {}, 1, 2, 256),
            ("mhp", {}, 1, 2, 128),
            ("fc", {}, 1, 2, 64), ("fc", {}, 1, None, 64), ("fc", {"sharded": True}, 2, 2, 64),
            ("partial_fc", {"sharded": True, "sample_rate": 0.1}, 2, 2, 64),
            ("mhs", {"sharded": True, "mode": "batch_union", "num_sampled_groups": 1}, 2, 2, 64),
            ("mhc", {"sharded": True}, 2, 2, 64), ("fc", {"sharded": True}, 2, 3, 64)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--limit", type=int, default=0, help="run only the first N cases")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base_overrides = [f"data.num_classes={args.classes}", "train.threads=1", "optim.name=adamw"]
    cfg = load_config(CONFIG, base_overrides)
    shape = backbone_shape(cfg)
    ctx = PlanContext(shape.params, shape.largest_layer, {("fp32", False): meta_activation_line(cfg, "fp32")},
                      device="cpu")
    from mhe_scale.labels.codec import factorize

    sizes = tuple(factorize(args.classes, 2))
    rows: list[ProbeResult] = []
    todo = cases(args.classes)[: args.limit or None]
    start = time.perf_counter()
    for name, fields, world, stage, b in todo:
        hs = HeadSpec(name, args.classes, shape.dim, sizes=sizes if name in ("mhp", "mhs", "mhc") else None, **fields)
        setup = Setup(world, b, 1, stage, False, False, "fp32", False, hs, f"{name}")
        base = replace(setup, head_label="")  # always write the head override
        files = write_setup(setup, base, f"/tmp/plan_bench/{len(rows)}", CONFIG, base_overrides, 0.0, None, world, 1,
                            False)
        overrides = files.override_list + ["eval.baseline=null", f"data.num_train={setup.global_batch * STEPS}",
                                           f"data.num_test={8 * world}", "train.epochs=1"]
        r = run_probe(setup, CONFIG, overrides, args.timeout)
        print(f"[{time.perf_counter() - start:.0f}s] {setup.describe()}: {r.status} "
              f"{(r.peak or 0) / MiB:.1f} MiB {r.detail}", flush=True)
        rows.append(r)
    rows = fit_and_predict(rows, ctx)
    lines = ["| head | C | processes | ZeRO | micro-batch | predicted MiB | measured MiB | error | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.setup
        zero = "none (DDP)" if s.zero_stage is None else str(s.zero_stage)
        head = s.head.name + (" (sharded)" if s.head.sharded else "")
        if r.status != "ok" or r.peak is None:
            lines.append(f"| {head} | {args.classes:,} | {s.world} | {zero} | {s.micro_batch} | "
                         f"{r.predicted / MiB:.0f} | {r.status} | | |")
            continue
        err = (r.predicted - r.peak) / r.peak * 100
        ok = abs(r.predicted - r.peak) <= max(0.15 * r.peak, 64 * MiB)
        lines.append(f"| {head} | {args.classes:,} | {s.world} | {zero} | {s.micro_batch} | {r.predicted / MiB:.0f} | "
                     f"{r.peak / MiB:.0f} | {err:+.1f}% | {'fit' if r.fitted_on else ('ok' if ok else 'OVER')} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
