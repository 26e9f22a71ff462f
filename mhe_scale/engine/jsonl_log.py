"""Reading the per-step JSON-lines logs (loss_log.jsonl, eval_log.jsonl) back on resume.

A run killed while appending can leave a torn last line; it is dropped with a warning naming the
file (the resumed run rewrites those steps). A bad line anywhere else is an error naming the file
and line: that file was not written by an interrupted run alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def read_step_lines(path: Path) -> list[tuple[int, str]]:
    """(step, line) for every line of a step log; [] when the file does not exist."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            step = json.loads(line)["step"]
            if not isinstance(step, int):
                raise TypeError(f"step is {step!r}")
        except (ValueError, KeyError, TypeError) as exc:
            if i == len(lines) - 1 and isinstance(exc, ValueError):
                logger.warning("%s: dropping its torn last line %d (%r), left by an interrupted write",
                               path, i + 1, line[:80])
                break
            raise ValueError(f"{path} line {i + 1}: not a step record ({exc}); delete the file or that line, "
                             "or choose another train.output_dir") from exc
        rows.append((step, line))
    return rows
