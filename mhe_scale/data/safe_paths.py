"""Paths read from data files (list files, multi-label JSONs, importers' inputs) stay under their root.

A record's path is joined to its root and normalised lexically (`..` removed, symlinks NOT followed:
a symlinked dataset folder inside the root is allowed); an absolute path, or one whose normalised form
leaves the root, is refused with a one-line error naming where the record came from.
"""

from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    """A record's path is absolute or resolves outside its root."""


def resolve_under(root: str | os.PathLike, relative: str, where: str) -> Path:
    """root / relative, normalised; PathEscapeError naming `where` (file:line or file[record]) otherwise."""
    if os.path.isabs(relative) or relative.startswith("~"):
        raise PathEscapeError(f"{where}: path {relative!r} is absolute; write it relative to {root}")
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, relative))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise PathEscapeError(f"{where}: path {relative!r} resolves outside its root {base}; keep every path "
                              f"inside the root (or point the root at a folder that holds it)")
    return Path(full)


def relative_under(root: str | os.PathLike, path: str | os.PathLike, where: str) -> str:
    """`path` written relative to root (for importers); PathEscapeError when it lies outside root."""
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.abspath(path))
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise PathEscapeError(f"{where}: {full} is outside the image root {base}; pass a root that holds it")
    return os.path.relpath(full, base)
