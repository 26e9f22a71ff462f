"""One probe rank: `python -m mhe_scale.plan.probe_run CONFIG [key=value ...]` trains like mhe_scale.train and
writes $MHE_PLAN_PROBE_OUT/rank<R>.json: {"rss_peak": bytes, "cuda_peak": bytes | null, "rc": int} or
{"oom": true, "error": "..."} when the run ran out of memory."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _write(payload: dict) -> None:
    out = os.environ.get("MHE_PLAN_PROBE_OUT")
    if out:
        rank = os.environ.get("RANK", "0")
        Path(out, f"rank{rank}.json").write_text(json.dumps(payload))


def main(argv: list[str]) -> int:
    import torch

    from mhe_scale.train import main as train_main

    try:
        rc = train_main(argv)
    except torch.OutOfMemoryError as exc:
        _write({"oom": True, "error": str(exc).splitlines()[0]})
        return 3
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    _write({"rss_peak": rss, "cuda_peak": cuda, "rc": rc})
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
