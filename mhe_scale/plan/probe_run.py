"""One probe rank: `python -m mhe_scale.plan.probe_run CONFIG [key=value ...]` trains like mhe_scale.train and
writes $MHE_PLAN_PROBE_OUT/rank<R>.json: {"rss_peak": bytes, "run_rss_peak": bytes, "setup_rss_peak": bytes,
"cuda_peak": bytes | null, "rc": int} or {"oom": true, "error": "..."} when the run ran out of memory.

rss_peak is the peak resident size from the start of the engine's fit (training, its evaluations and saves):
on Linux the high-water mark is reset when fit starts (writing 5 to /proc/self/clear_refs; VmHWM then
restarts from the resident size at that moment, which still holds the libraries, the model and the data).
The peak of building the data and model before fit (setup_rss_peak) is a task's own business, outside the
memory model (docs/planner.md); run_rss_peak = getrusage's peak of the whole process. Where the reset is not
possible, rss_peak is run_rss_peak."""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import sys
from pathlib import Path
from typing import Any, Callable, Optional

_SETUP_PEAK: list[int] = []


def _write(payload: dict) -> None:
    out = os.environ.get("MHE_PLAN_PROBE_OUT")
    if out:
        rank = os.environ.get("RANK", "0")
        Path(out, f"rank{rank}.json").write_text(json.dumps(payload))


def vm_hwm() -> Optional[int]:
    """This process's resident high-water mark in bytes from /proc/self/status (None off Linux)."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_hwm() -> bool:
    """Restart VmHWM from the current resident size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mark_fit(fit: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fit)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before = vm_hwm()
        if not _SETUP_PEAK and before is not None and reset_hwm():
            _SETUP_PEAK.append(before)
        return fit(*args, **kwargs)
    return wrapped


def main(argv: list[str]) -> int:
    import torch

    import mhe_scale.engine as engine
    import mhe_scale.engine.loop as loop

    loop.fit = engine.fit = _mark_fit(loop.fit)  # before the tasks import it (mhe_scale.train imports them)
    from mhe_scale.train import main as train_main

    try:
        rc = train_main(argv)
    except torch.OutOfMemoryError as exc:
        _write({"oom": True, "error": str(exc).splitlines()[0]})
        return 3
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; the reset restarts it too
    fit_peak = vm_hwm() if _SETUP_PEAK else None
    setup = _SETUP_PEAK[0] if _SETUP_PEAK else None
    _write({"rss_peak": fit_peak or run, "run_rss_peak": max(run, setup or 0), "setup_rss_peak": setup,
            "cuda_peak": cuda, "rc": rc})
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
