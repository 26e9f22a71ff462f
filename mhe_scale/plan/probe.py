"""`--probe`: run set-ups for a few steps through the real engine and compare with the memory model.

Each probe is a fresh process tree: `python -m mhe_scale.plan.probe_run CONFIG overrides` (one process) or
`torchrun --nproc_per_node W -m mhe_scale.plan.probe_run ...` (several; gloo on CPU), with small data and
train.epochs set so a few optimizer steps run. probe_run writes per rank the peak resident size
(resource.getrusage(RUSAGE_SELF).ru_maxrss, the same number RUSAGE_CHILDREN reports to the parent for
that child) and, on CUDA, torch.cuda.max_memory_allocated(); plus the train seconds and samples/s from
results.json. A set-up that runs out of memory (CUDA OOM, or a process killed by the kernel) is a
row saying so, not a crash of the planner.

Activation fit: measured peak minus the model's non-activation terms, at two micro-batches of the first
set-up, gives base + per_sample * b; every row is then predicted with that line. Lines are kept per
(precision, checkpointing, world size): a row at W uses the line fitted at W (the process group's per-rank
cost is in its base); without one, the one-process line plus the process-group term.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from mhe_scale.plan.candidates import PlanContext, Setup, breakdown
from mhe_scale.plan.memory import ActivationLine, fmt_bytes


IN_LINE_BASE = ("activations", "runtime", "process group")
"""Terms a fitted activation line replaces: its base holds the runtime's and the process group's fixed costs."""


@dataclass(frozen=True)
class ProbeResult:
    setup: Setup
    status: str
    """ok | oom | failed (message in detail) | timeout"""
    peak: Optional[float] = None
    """Largest per-rank peak (RSS on CPU, max_memory_allocated on CUDA), bytes."""
    step_seconds: Optional[float] = None
    detail: str = ""
    predicted: Optional[float] = None
    fitted_on: bool = False
    """This row is one of the two the activation line was fitted to (its error is ~0 by construction)."""


def probe_command(setup: Setup, config: str, overrides: list[str]) -> list[str]:
    if setup.world == 1:
        return [sys.executable, "-m", "mhe_scale.plan.probe_run", config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={setup.world}",
            "-m", "mhe_scale.plan.probe_run", config, *overrides]


def run_probe(setup: Setup, config: str, overrides: list[str], timeout: int, env: Optional[dict] = None) -> ProbeResult:
    """One set-up in a fresh process tree; never raises for a failed run."""
    with tempfile.TemporaryDirectory(prefix="mhe_plan_probe_") as tmp:
        out = Path(tmp)
        overrides = list(overrides) + [f"train.output_dir={out / 'run'}", "train.save_every=0", "train.resume=false",
                                       "train.log_every=1"]
        environ = dict(os.environ if env is None else env, MHE_PLAN_PROBE_OUT=str(out))
        environ.pop("ACCELERATE_USE_CPU", None)  # it would silently drop DeepSpeed (ENVIRONMENT.md)
        start = time.perf_counter()
        proc = subprocess.Popen(probe_command(setup, config, overrides), env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # the whole tree (torchrun's workers too); SIGTERM first so a JIT
            os.killpg(proc.pid, signal.SIGTERM)  # build can release its lock file
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            return ProbeResult(setup, "timeout", detail=f"over {timeout}s")
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        if any(r.get("oom") for r in ranks):
            return ProbeResult(setup, "oom", detail=next(r["error"] for r in ranks if r.get("oom"))[:200])
        if proc.returncode != 0:
            killed = proc.returncode in (-9, 137) or "Killed" in proc.stderr or "SIGKILL" in proc.stderr
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            return ProbeResult(setup, "oom" if killed else "failed", detail=tail if not killed else "killed (out of memory)")
        peak = max((r["cuda_peak"] if r.get("cuda_peak") else r["rss_peak"]) for r in ranks) if ranks else None
        results = out / "run" / "results.json"
        step = None
        if results.is_file():
            costs = next(iter(json.loads(results.read_text()).values()))["costs"]
            if costs.get("samples/s"):
                step = setup.global_batch / costs["samples/s"]
        return ProbeResult(setup, "ok", peak, step, f"{time.perf_counter() - start:.0f}s wall")


def small_data_overrides(cfg: Any, setup: Setup, steps: int) -> list[str]:
    """Overrides that make a run a few steps long: synthetic data sized to steps global batches; other
    tasks keep their data and run a fraction of an epoch (pass --probe-overrides for anything else)."""
    out = ["eval.baseline=null"] if hasattr(cfg.eval, "baseline") else []
    if cfg.task == "synthetic":
        out += [f"data.num_train={setup.global_batch * steps}", f"data.num_test={max(setup.world * 8, 16)}",
                "train.epochs=1"]
    return out


def probe_setups(setups: list[Setup], base: Setup, ctx: PlanContext, args: Any, cfg: Any) -> list[ProbeResult]:
    """Probe each set-up, fit the activation line from the first one at two micro-batches, predict all rows."""
    from mhe_scale.plan.writer import write_setup

    can_ckpt = hasattr(cfg.model, "grad_checkpointing")
    rows: list[ProbeResult] = []
    first = setups[0]
    half = replace(first, micro_batch=max(first.micro_batch // 2, 1), accum=first.accum * 2 if first.micro_batch > 1 else first.accum)
    todo = [half] + [s for s in setups if s != half] if half.micro_batch != first.micro_batch else list(setups)
    with tempfile.TemporaryDirectory(prefix="mhe_plan_files_") as tmp:
        for i, s in enumerate(todo):
            from mhe_scale.plan.candidates import run_spec

            files = write_setup(s, base, Path(tmp) / str(i), args.config, list(args.overrides),
                                float(cfg.train.clip_grad_norm or 0.0), run_spec(s, ctx).engine, args.gpus, args.nodes,
                                can_ckpt)
            overrides = files.override_list + small_data_overrides(cfg, s, args.probe_steps) + list(args.probe_overrides)
            print(f"probe {i + 1}/{len(todo)}: {s.describe()}", flush=True)
            rows.append(run_probe(s, args.config, overrides, args.probe_timeout))
    return fit_and_predict(rows, ctx)


def fit_activations(a: ProbeResult, b: ProbeResult, ctx: PlanContext) -> Optional[ActivationLine]:
    """base + per_sample * micro_batch through two measured rows of one set-up (different micro-batches)."""
    if a.peak is None or b.peak is None or a.setup.micro_batch == b.setup.micro_batch:
        return None

    def rest(r: ProbeResult) -> float:
        terms = [t for t in breakdown(r.setup, ctx).terms if t.name not in IN_LINE_BASE]
        return sum(t.device + (t.host if ctx.device == "cpu" else 0.0) for t in terms)

    ya, yb = a.peak - rest(a), b.peak - rest(b)
    slope = (yb - ya) / (b.setup.micro_batch - a.setup.micro_batch)
    return ActivationLine(ya - slope * a.setup.micro_batch, slope, "fitted to --probe (incl. runtime)")


def fit_lines(rows: list[ProbeResult], ctx: PlanContext) -> tuple[dict[tuple[str, bool, int], ActivationLine],
                                                                       set[int]]:
    """Activation lines keyed by (precision, checkpointing, world): for each key, the first two ok rows whose
    set-ups differ only in micro-batch (and accumulation). Returns the lines and the indices of the rows used."""
    lines: dict[tuple[str, bool, int], ActivationLine] = {}
    used: set[int] = set()
    for i, a in enumerate(rows):
        key = (a.setup.precision, a.setup.checkpointing, a.setup.world)
        if key in lines or a.status != "ok":
            continue
        for j in range(i + 1, len(rows)):
            b = rows[j]
            if b.status == "ok" and replace(b.setup, micro_batch=a.setup.micro_batch, accum=a.setup.accum) == a.setup:
                line = fit_activations(a, b, ctx)
                if line is not None:
                    lines[key] = line
                    used |= {i, j}
                    break
    return lines, used


def process_group_cost(lines: dict[tuple[str, bool, int], ActivationLine], key: tuple[str, bool, int]) -> Optional[float]:
    """base(W) - base(1) of the lines fitted at W and at one process with the same precision and checkpointing:
    the per-rank cost of the W-process group (a line's base holds everything not proportional to b)."""
    one = lines.get((key[0], key[1], 1))
    at_w = lines.get(key)
    return None if one is None or at_w is None else at_w.base - one.base


def fit_and_predict(rows: list[ProbeResult], ctx: PlanContext) -> list[ProbeResult]:
    """Predict every row. A row uses the line fitted at its own (precision, checkpointing, world) when there is
    one (its base holds the runtime's fixed cost and the process group's), else the one-process line of its
    precision plus the process-group term (measured base(W) - base(1) when some world size has both lines, else
    the model's default), else the meta-device line. On CPU host terms count too (RSS)."""
    lines, used = fit_lines(rows, ctx)
    measured_pg = [process_group_cost(lines, k) for k in lines if k[2] > 1]
    measured_pg = [x for x in measured_pg if x is not None]
    pg_default = max(measured_pg) if measured_pg else ctx.process_group_bytes
    out = []
    for i, r in enumerate(rows):
        s = r.setup
        own, one = (s.precision, s.checkpointing, s.world), (s.precision, s.checkpointing, 1)
        use = ctx
        if own in lines:
            use = replace(ctx, activations={**ctx.activations, (s.precision, s.checkpointing): lines[own]},
                          fixed_bytes=0.0, process_group_bytes=0.0)
        elif one in lines:
            use = replace(ctx, activations={**ctx.activations, (s.precision, s.checkpointing): lines[one]},
                          fixed_bytes=0.0, process_group_bytes=pg_default)
        b = breakdown(s, use)
        out.append(replace(r, predicted=b.device + (b.host if ctx.device == "cpu" else 0.0), fitted_on=i in used))
    return out


def format_probe(rows: list[ProbeResult]) -> str:
    lines = [f"  {'predicted':>10s} {'measured':>10s} {'error':>7s} {'step s':>7s}  set-up"]
    for r in rows:
        if r.status != "ok" or r.peak is None:
            lines.append(f"  {fmt_bytes(r.predicted or 0):>10s} {r.status.upper():>10s} {'':>7s} {'':>7s}  "
                         f"{r.setup.describe()}  ({r.detail})")
            continue
        err = (r.predicted - r.peak) / r.peak * 100 if r.predicted else float("nan")
        step = f"{r.step_seconds:.3f}" if r.step_seconds else "-"
        lines.append(f"  {fmt_bytes(r.predicted or 0):>10s} {fmt_bytes(r.peak):>10s} {err:+6.1f}% {step:>7s}  "
                     f"{r.setup.describe()}{'  (fit)' if r.fitted_on else ''}")
    return "\n".join(lines)
