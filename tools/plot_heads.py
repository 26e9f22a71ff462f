#!/usr/bin/env python
"""Plot the heads benchmark (step time and parameter + Adam state against C, log-log) from its table.

    python tools/plot_heads.py docs/benchmarks.md --out docs/img/heads_scaling.png

Reads the markdown table that tools/bench_heads.py prints (columns C | head | step (ms) | ... |
params + Adam state | ...) from the given file: the first such table in it. Skipped rows (a head
that did not fit) are left out of the plot. No numbers are measured here.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
ROW = re.compile(r"^\|\s*([\d,]+)\s*\|\s*([^|]+?)\s*\|\s*([\d.]+)\s*\|[^|]*\|\s*([\d.]+)\s*([KMGT]?B)\s*\|")


def parse_heads_table(text: str) -> dict[str, list[tuple[int, float, float]]]:
    """{head name (sizes dropped): [(C, step ms, state bytes), ...]} from the first heads table."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    started = False
    for line in text.splitlines():
        if line.startswith("| C | head | step (ms)"):
            started = True
            continue
        if not started:
            continue
        if not line.startswith("|"):
            if series:
                break
            continue
        m = ROW.match(line)
        if m is None:  # the separator row, or a skipped head
            continue
        classes, head, step_ms, size, unit = m.groups()
        name = head.split(" [")[0]
        series.setdefault(name, []).append((int(classes.replace(",", "")), float(step_ms), float(size) * UNITS[unit]))
    if not series:
        raise ValueError("no 'C | head | step (ms) | ...' table found; point at the file tools/bench_heads.py wrote")
    return series


def plot(series: dict[str, list[tuple[int, float, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in series.items():
        c = [p[0] for p in points]
        left.plot(c, [p[1] for p in points], marker="o", label=name)
        right.plot(c, [p[2] / 2**20 for p in points], marker="o", label=name)
    for ax, title, unit in ((left, "one training step", "ms"), (right, "head parameters + AdamW state", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    right.legend(loc="upper left", fontsize=8)
    fig.suptitle("Heads at D = 512, batch 256, 2-core CPU (docs/benchmarks.md)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path, help="markdown file holding the bench_heads.py table")
    parser.add_argument("--out", type=Path, default=Path("docs/img/heads_scaling.png"))
    args = parser.parse_args(argv)
    try:
        series = parse_heads_table(args.table.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"plot_heads: error: {args.table}: {err}", file=sys.stderr)
        return 2
    plot(series, args.out)
    print(f"wrote {args.out} ({', '.join(f'{k}: {len(v)} sizes' for k, v in series.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
