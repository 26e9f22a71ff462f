"""Where a path from a config is looked for: as given (from the working directory), then, when
relative, from the repository root (so `mhe-scale train configs/...` works from anywhere)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_path_candidates(path: str) -> list[Path]:
    """The places `path` (a config value) may name, in the order they are tried."""
    given = Path(path).expanduser()
    return [given] if given.is_absolute() else [given, REPO_ROOT / given]
