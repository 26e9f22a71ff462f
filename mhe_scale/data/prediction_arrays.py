"""Ranked XMC predictions as arrays: `.npz` or safetensors files holding `ids` [N, K] (integer
label ids, best first, -1 = none) and optionally `scores` [N, K] (non-increasing along each row).

The format is told by the file's first bytes, not its name (a zip archive is .npz, an 8-byte
header length followed by '{' is safetensors), so a misnamed file still reads. Nothing is unpickled
(np.load with allow_pickle=False). Every refusal is one line naming the file.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ARRAY_SUFFIXES = (".npz", ".safetensors")
_SAVE_HINT = "save predictions with np.savez(path, ids=..., scores=...) or safetensors' save_file"


def array_format(path: str | os.PathLike) -> str | None:
    """'npz', 'safetensors', or None for anything else (e.g. a text file), from the first bytes.

    A file named .npz / .safetensors that is neither raises ValueError naming it."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "npz"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    if path.suffix in ARRAY_SUFFIXES:
        what = "a bare .npy array" if head.startswith(b"\x93NUMPY") else "empty" if not head else "not a zip archive"
        raise ValueError(f"{path}: neither an .npz (zip) nor a safetensors file ({what}); {_SAVE_HINT}")
    return None


def _load(path: Path, fmt: str) -> dict[str, np.ndarray]:
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                return {name: z[name] for name in z.files if name in ("ids", "scores")}
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return {k: v for k, v in load_file(path).items() if k in ("ids", "scores")}
        except SafetensorError as err:
            raise ValueError(str(err)) from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        if "allow_pickle" in reason:
            raise ValueError(f"{path}: holds object (pickled) arrays, which are never loaded here; store 'ids' as "
                             f"integers and 'scores' as floats") from None
        raise ValueError(f"{path}: cannot read it as {fmt} ({reason}); is it truncated? {_SAVE_HINT}") from None


def read_prediction_arrays(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """-> (ids LongTensor [N, K], -1 = none; scores float32 [N, K] with -inf where ids is -1, or None)."""
    path = Path(path)
    fmt = array_format(path)
    if fmt is None:
        raise ValueError(f"{path}: not an .npz or safetensors file; {_SAVE_HINT}")
    arrays = _load(path, fmt)
    if "ids" not in arrays:
        raise ValueError(f"{path}: no array 'ids'; {_SAVE_HINT}")
    ids, scores = arrays["ids"], arrays.get("scores")
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'ids' must be an integer array [N, K], got {ids.dtype} {ids.shape}")
    if (ids < -1).any():
        raise ValueError(f"{path}: row {int((ids < -1).any(1).argmax())} (0-based) holds an id below -1; "
                         f"use -1 for a missing prediction")
    ids_t = torch.from_numpy(ids.astype(np.int64))
    if scores is None:
        return ids_t, None
    if scores.shape != ids.shape or scores.dtype.kind != "f":
        raise ValueError(f"{path}: 'scores' must be a float array shaped like 'ids' {ids.shape}, "
                         f"got {scores.dtype} {scores.shape}")
    real = ids >= 0
    if np.isnan(scores[real]).any():
        raise ValueError(f"{path}: row {int((np.isnan(scores) & real).any(1).argmax())} (0-based) has a NaN score")
    rising = (scores[:, 1:] > scores[:, :-1]) & real[:, 1:]
    if rising.any():
        raise ValueError(f"{path}: row {int(rising.any(1).argmax())} (0-based) has scores increasing "
                         f"along it; store each row best first (sort by score, descending)")
    scores_t = torch.from_numpy(scores.astype(np.float32)).masked_fill(~torch.from_numpy(real), float("-inf"))
    return ids_t, scores_t
