"""Pieces the head benchmarks share: byte formatting, the memory budget, one measurement per subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GB"


def available_gb(fraction: float) -> float:
    """`fraction` of /proc/meminfo's MemAvailable, in GB (the default skip threshold)."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    return fraction * avail / 1e9


def run_isolated(cmd: list[str], echo_stderr: bool = False) -> dict | None:
    """Run one measurement in a fresh process (its peak memory is its own); its last stdout line is a
    JSON row. None (stderr tail printed) when it failed; echo_stderr prints its stderr in any case."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if echo_stderr and proc.returncode == 0:
        print(proc.stderr, file=sys.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed_steps(head, optimizer, features, labels, steps: int, sync=None) -> tuple[list[float], list[float], object]:
    """steps + 1 training steps (forward, backward, optimizer) of `head`; the first is a warm-up.
    sync(): run before the clock starts and before it stops (cuda synchronize, or a barrier so the time is
    the slowest rank's). -> (step seconds [steps], forward + backward seconds [steps], last HeadOutput)."""
    import time

    times, passes, out = [], [], None
    for i in range(steps + 1):
        if sync is not None:
            sync()
        start = time.perf_counter()
        out = head(features, labels)
        out.loss.backward()
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        features.grad = None
        if sync is not None:
            sync()
        if i > 0:
            times.append(time.perf_counter() - start)
            passes.append(backward_done - start)
    return times, passes, out


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (momentum, moments, per-row counters; scalar
    step counts left out)."""
    import torch

    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def emit_table(table: str, out: str | Path | None) -> None:
    """Print the markdown table; append it to `out` when given."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(table + "\n")
