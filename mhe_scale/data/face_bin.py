"""Face verification pair files in insightface's `.bin` layout (LFW, CFP-FP, AgeDB-30, ...).

A `.bin` file is a pickle of `(images, issame)`: `images` a list of 2P encoded images (JPEG/PNG
bytes), pair i being images 2i and 2i+1, and `issame` P booleans (same identity or not).
Pickle can run arbitrary code while loading, so these files are read with `RestrictedUnpickler`,
which resolves no class or function except one pure string function: bytes, lists, tuples, bools
and ints need none, except that Python 3 writes bytes at pickle protocols 0-2 as
`_codecs.encode(text, "latin1")`; that one call is answered by a stand-in that only does
`text.encode("latin1")` (any other encoding is refused), so files written at protocols 0-5 read.
Only with `allow_numpy=True` (the default; some files store `issame` as a numpy bool array) does it
resolve the few numpy callables that rebuild an array (`numpy.ndarray`, `numpy.dtype`,
`numpy[._]core.multiarray._reconstruct` and `.scalar`, and protocol 5's
`numpy[._]core.numeric._frombuffer`); they allocate arrays and call nothing else, and object-dtype arrays are refused after loading. Everything else (e.g. `os.system`)
raises FaceBinError naming the file and the refused global. Files written by Python 2 are read
with `encoding="bytes"` when the default decoding fails.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_NUMPY_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
})


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode` in pickles: Python 3 stores bytes at protocols 0-2 as
    _codecs.encode(text, 'latin1'); only that (pure) call is answered."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as (str, 'latin1'), got ({type(text).__name__}, "
                                     f"{encoding!r})")
    return text.encode("latin1")


class FaceBinError(ValueError):
    """A .bin pair file that cannot be read safely or correctly; the message names the file."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except (optionally) numpy's array reconstruction."""

    def __init__(self, file: io.BufferedIOBase, path: str | os.PathLike, allow_numpy: bool = True,
                 encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.path, self.allow_numpy = path, allow_numpy

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if self.allow_numpy and (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise FaceBinError(self.path, f"refusing to load global {module}.{name}: a .bin pair file holds only "
                                      f"image bytes and booleans; this file may be malicious or not a .bin pair "
                                      f"file (re-create it with mhe_scale.data.face_bin.write_face_bin)")


def restricted_loads(data: bytes, path: str | os.PathLike = "<bytes>", allow_numpy: bool = True) -> object:
    """Unpickle `data` with RestrictedUnpickler; Python-2 pickles are retried with encoding='bytes'."""
    for encoding in ("ASCII", "bytes"):
        try:
            return RestrictedUnpickler(io.BytesIO(data), path, allow_numpy, encoding).load()
        except UnicodeDecodeError:
            continue
        except FaceBinError:
            raise
        except Exception as err:  # UnpicklingError, EOFError, ValueError, ... on damaged files
            raise FaceBinError(path, f"not a readable pickle ({type(err).__name__}: {err})") from None
    raise FaceBinError(path, "strings in the pickle decode neither as ASCII nor as bytes")


@dataclass(frozen=True)
class FaceBin:
    """Contents of a .bin pair file: `images` 2P encoded images, `issame` bool [P]."""

    path: str
    images: list[bytes]
    issame: Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.issame.numel())

    def decode(self, start: int = 0, stop: int | None = None, size: int = 112) -> Tensor:
        """Images start..stop-1 -> uint8 [n, 3, size, size] RGB; other sizes are resized (bilinear)."""
        stop = len(self.images) if stop is None else stop
        out = torch.empty(max(stop - start, 0), 3, size, size, dtype=torch.uint8)
        for row, index in enumerate(range(start, stop)):
            try:
                with Image.open(io.BytesIO(self.images[index])) as img:
                    rgb = img.convert("RGB")
                    if rgb.size != (size, size):
                        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                    pixels = np.array(rgb)
            except Exception as err:  # PIL raises OSError, SyntaxError, ... on corrupt bytes
                raise FaceBinError(self.path, f"image {index} ({len(self.images[index])} bytes) does not "
                                              f"decode: {err}") from None
            out[row] = torch.from_numpy(pixels).permute(2, 0, 1)
        return out


def _as_issame(raw: object, path: str) -> Tensor:
    try:
        arr = np.asarray(raw)
    except Exception as err:
        raise FaceBinError(path, f"issame is not a list of booleans ({err})") from None
    if arr.ndim != 1:
        raise FaceBinError(path, f"issame must be 1-D (one flag per pair), got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise FaceBinError(path, f"issame must hold booleans, got dtype {arr.dtype}")
        arr = arr.astype(np.bool_)
    return torch.from_numpy(arr.copy())


def read_face_bin(path: str | os.PathLike, allow_numpy: bool = True) -> FaceBin:
    """Read a .bin pair file safely (see the module docstring); images stay encoded until decode()."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FaceBinError(path, f"cannot read: {err.strerror}") from None
    obj = restricted_loads(data, path, allow_numpy)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise FaceBinError(path, f"expected a pickled pair (images, issame), got {type(obj).__name__}")
    raw_images, raw_issame = obj
    if not isinstance(raw_images, (list, tuple)):
        raise FaceBinError(path, f"images must be a list of encoded images, got {type(raw_images).__name__}")
    images: list[bytes] = []
    for i, blob in enumerate(raw_images):
        if isinstance(blob, np.ndarray) and blob.dtype == np.uint8:
            blob = blob.tobytes()
        if not isinstance(blob, (bytes, bytearray)):
            raise FaceBinError(path, f"image {i} is a {type(blob).__name__}, expected encoded image bytes")
        images.append(bytes(blob))
    issame = _as_issame(raw_issame, path)
    if len(images) != 2 * issame.numel():
        raise FaceBinError(path, f"{len(images)} images for {issame.numel()} pairs; expected exactly 2 per pair")
    return FaceBin(path, images, issame)


def encode_images(images: Tensor, fmt: str = "JPEG", quality: int = 95) -> list[bytes]:
    """uint8 [N, 3, H, W] RGB -> N encoded images (JPEG by default, or PNG)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_images expects uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    out = []
    for pixels in images.permute(0, 2, 3, 1).contiguous().numpy():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {}))
        out.append(buf.getvalue())
    return out


def write_face_bin(path: str | os.PathLike, images: Sequence[bytes] | Tensor, issame: Sequence[bool] | Tensor) -> None:
    """Write (images, issame) in the .bin layout (plain pickle, Python bools); atomic via rename.

    images: 2P encoded images, or uint8 [2P, 3, H, W] (then JPEG-encoded); issame: P booleans.
    """
    blobs = encode_images(images) if isinstance(images, Tensor) else [bytes(b) for b in images]
    flags = [bool(v) for v in (issame.tolist() if isinstance(issame, Tensor) else issame)]
    if len(blobs) != 2 * len(flags):
        raise ValueError(f"write_face_bin({path}): {len(blobs)} images for {len(flags)} pairs; need 2 per pair")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump((blobs, flags), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
