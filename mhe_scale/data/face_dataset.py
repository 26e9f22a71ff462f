"""Face-recognition datasets in RecordIO: read (both layouts), synthesise, and pack from folders.

Two layouts of image records (IRHeader + JPEG/PNG, see recordio.py) are in use:
- insightface (e.g. MS1MV2, CASIA-WebFace as insightface ships them): key 0 is a header record,
  flag 2, label [id_start, id_end], no image. Keys 1 .. id_start-1 are the images (label =
  identity). Keys id_start .. id_end-1 are identity records, flag 2, label [a, b], no image:
  identity (key - id_start) owns image keys a .. b-1. These ranges give all labels without
  reading any image. Keys are stored as float32 there, so the layout is exact below 2**24 records.
- im2rec (MXNet's tools/im2rec.py; what DALI wants): no header record; every key is an image.
  Labels come from PREFIX.lst (`key<TAB>label(s)<TAB>path`) when it exists and the .idx is
  given, else from each record's IRHeader.
A label array (flag > 0) counts by its first value, as insightface does; records with several
labels (flag > 1, or .lst lines with several) get a warning, since single-label training drops the rest.
"""

from __future__ import annotations

from typing import Optional

import io
import os
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from mhe_scale.data.recordio import (IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, open_temp_beside,
                                     pack_image_record)


@dataclass(kw_only=True)
class FaceDataConfig:
    """data section of the face task (aligned face images: RecordIO or synthetic)."""

    name: str = "face_recordio"
    """Dataset kind: 'synthetic' (generated, planted structure) or a reader name added by tasks."""
    path: Optional[str] = None
    """Folder or file of a real dataset (unused by 'synthetic'). 'xc': a folder holding train.txt and
    test.txt in the Extreme Classification Repository format; a relative path is looked up from the
    working directory, then from the repository root."""
    idx_path: Optional[str] = None
    """face_recordio: the .idx of the .rec file given as data.path (default: data.path with suffix .idx)."""
    num_classes: int = field(default=100_000, metadata={"min": 2})
    """Synthetic: number of labels C."""
    num_train: int = field(default=60_000, metadata={"min": 1})
    """Synthetic: training points."""
    image_size: int = 112
    """face: side S of the square training images (aligned faces: 112); records of another size are resized,
    and the backbone is built for this input size."""
    dali: bool = False
    """face_recordio: decode, flip and normalise with NVIDIA DALI (GPU 'mixed' decoding under CUDA, CPU
    otherwise); if nvidia.dali cannot be imported the PyTorch reader is used and a warning printed."""
    random_flip: bool = True
    """face: horizontal flip of each training image with probability 0.5."""
    num_workers: int = 2
    """face: DALI decoding threads (data.dali); worker processes of face loaders built with
    mhe_scale.data.dali_face.build_face_loader (engine.fit reads in the main process)."""
    seed: int = 0
    """Seed of the generator (data is a pure function of the config)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LAYOUTS = ("auto", "insightface", "im2rec")


def first_label(header: IRHeader) -> float:
    """The class of an image record: the scalar label, or the first of a label array."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


def warn_several_labels(source: str | os.PathLike, key: int, values: Sequence[float]) -> None:
    """Single-label training keeps only values[0] of a record with several labels: say so."""
    shown = ", ".join(f"{float(v):g}" for v in list(values)[:4]) + (", ..." if len(values) > 4 else "")
    warnings.warn(f"{source}: key {key} carries {len(values)} labels [{shown}] (e.g. IRHeader flag {len(values)}); "
                  f"single-label training takes the first ({float(values[0]):g}) as the class and ignores the rest. "
                  "For multi-label records use a multi-label reader; if the class is another value, repack the file",
                  UserWarning, stacklevel=3)


def decode_image(image_bytes: bytes, where: str = "<bytes>") -> Tensor:
    """Encoded image -> uint8 [3, H, W] RGB."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            pixels = np.array(img.convert("RGB"))
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt bytes
        raise RecordIOError(where, f"image bytes ({len(image_bytes)}) do not decode: {err}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _is_insightface_header(reader: RecordIOReader) -> bool:
    if 0 not in reader:
        return False
    header, image = reader.read_image(0)
    return header.flag >= 2 and len(image) == 0


def _key_range(label: np.ndarray, limit: int) -> tuple[int, int] | None:
    """Label [a, b, ...] -> (a, b) when both are integers with 0 <= a <= b <= limit, else None."""
    pair = np.asarray(label[:2], dtype=np.float64)
    if not (np.isfinite(pair).all() and (pair == np.floor(pair)).all() and 0 <= pair[0] <= pair[1] <= limit):
        return None
    return int(pair[0]), int(pair[1])


def _insightface_labels(reader: RecordIOReader) -> tuple[np.ndarray, np.ndarray]:
    """Header layout -> (image keys [N], labels [N]) from the header and identity records."""
    header, image = reader.read_image(0)
    if image:
        raise RecordIOError(reader.rec_path, f"key 0 holds a {len(image)}-byte image (IRHeader flag {header.flag}), so "
                            "it is not an insightface header (flag 2, label [id_start, id_end], no image); pass "
                            "layout='im2rec' (or 'auto') for files without one", reader.offset(0), 0)
    pair = _key_range(header.label, len(reader)) if header.flag >= 2 else None
    if pair is None or pair[0] < 1:
        raise RecordIOError(reader.rec_path, f"key 0 is not an insightface header (flag {header.flag}, label "
                            f"{header.label}; expected flag 2, label [id_start, id_end] with 1 <= id_start <= id_end "
                            f"<= {len(reader)} records); pass layout='im2rec' for files without one", key=0)
    id_start, id_end = pair
    missing = np.flatnonzero(~reader.has_keys(np.arange(1, id_end)))
    if missing.size:
        raise RecordIOError(reader.rec_path, f"the header record puts images at keys 1..{id_start - 1} and identity "
                            f"records at {id_start}..{id_end - 1}, but key {missing[0] + 1} is missing", key=0)
    ranges = np.zeros((id_end - id_start, 2), dtype=np.int64)
    for i, key in enumerate(range(id_start, id_end)):  # one small record per identity, at start-up
        ident, _ = reader.read_image(key)
        pair = _key_range(ident.label, id_start) if ident.flag >= 2 else None
        if pair is None:
            raise RecordIOError(reader.rec_path, f"identity record has flag {ident.flag}, label {ident.label}; "
                                f"expected flag 2, label [first image key, end image key] within 1..{id_start}",
                                reader.offset(key), key)
        ranges[i] = pair
    order = np.lexsort((ranges[:, 1], ranges[:, 0]))  # by start, empty ranges first
    starts, ends = ranges[order, 0], ranges[order, 1]
    gaps = np.flatnonzero(starts != np.concatenate([[1], ends[:-1]]))
    if not ends.size and id_start != 1:
        raise RecordIOError(reader.rec_path, f"the header record lists images 1..{id_start - 1} but no identity "
                            "records", key=0)
    if gaps.size or (ends[-1] if ends.size else 1) != id_start:
        i = int(order[gaps[0]]) if gaps.size else int(order[-1])
        raise RecordIOError(reader.rec_path, f"identity ranges must tile image keys 1..{id_start - 1} without gaps "
                            f"or overlaps; identity record {id_start + i} has range {ranges[i].tolist()}",
                            key=id_start + i)
    return np.arange(1, id_start, dtype=np.int64), np.repeat(order.astype(np.int64), ends - starts)


def read_lst(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """im2rec .lst -> (keys [N], first labels float64 [N])."""
    keys, labels, several = [], [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            try:
                if len(fields) < 3:
                    raise ValueError("too few fields")
                keys.append(int(fields[0]))
                labels.append(float(fields[1]))
                if several is None and len(fields) > 3:
                    several = (keys[-1], [float(v) for v in fields[1:-1]])
            except ValueError:
                raise RecordIOError(path, f"expected 'key<TAB>label(s)<TAB>path', got {line.rstrip()[:80]!r}",
                                    line=number) from None
    if several is not None:
        warn_several_labels(path, *several)
    return np.asarray(keys, dtype=np.int64), np.asarray(labels, dtype=np.float64)


def _header_labels(reader: RecordIOReader, keys: np.ndarray) -> np.ndarray:
    """First label of each record's IRHeader, reading only its first 28 bytes."""
    out = np.empty(len(keys), dtype=np.float64)
    several = None
    for i, key in enumerate(keys.tolist()):  # start-up scan; prefer a .lst for big files
        head = reader.read_prefix(key, 28)
        flag = struct.unpack_from("<I", head)[0] if len(head) >= 4 else 0
        if len(head) < 24 or (flag > 0 and len(head) < 28):
            raise RecordIOError(reader.rec_path, f"record of {len(head)} bytes is too short for an IRHeader",
                                reader.offset(key), key)
        out[i] = struct.unpack_from("<f", head, 24 if flag > 0 else 4)[0]
        several = key if several is None and flag > 1 else several
    if several is not None:
        warn_several_labels(reader.rec_path, several, reader.read_image(several)[0].label)
    return out


class RecordIOFaceDataset(Dataset):
    """Face images from an insightface- or im2rec-layout RecordIO file (see the module docstring).

    Items: (image uint8 [3, H, W] RGB, or transform(image); label int). `labels` int64 [N] and
    `num_classes` (= max label + 1) are known without decoding images; each item's own IRHeader
    label is checked against them.

    Args:
        rec_path, idx_path: the .rec and its .idx (None: scan the file; keys are then ordinals).
        transform: applied to the uint8 [3, H, W] tensor.
        layout: "auto" (insightface when key 0 is a flag >= 2 record without image), "insightface", "im2rec".
        labels_from: im2rec only: "auto" (PREFIX.lst if present and idx_path is given, else records),
            "lst", "records".
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 transform: Callable[[Tensor], object] | None = None, layout: str = "auto",
                 labels_from: str = "auto") -> None:
        if layout not in LAYOUTS or labels_from not in ("auto", "lst", "records"):
            raise ValueError(f"layout must be one of {LAYOUTS} and labels_from one of auto/lst/records; "
                             f"got layout={layout!r}, labels_from={labels_from!r}")
        self.reader = RecordIOReader(rec_path, idx_path)
        self.reader.check_last_record()  # a truncated .rec fails here, not minutes into a run
        self.transform = transform
        if layout == "auto":
            layout = "insightface" if _is_insightface_header(self.reader) else "im2rec"
        self.layout = layout
        if layout == "insightface":
            self.keys, labels = _insightface_labels(self.reader)
        else:
            lst_path = Path(rec_path).with_suffix(".lst")
            if labels_from == "lst" and idx_path is None:
                raise ValueError(f"labels_from='lst' needs idx_path: without the .idx, keys are record ordinals, "
                                 f"not the keys of {lst_path}")
            if labels_from == "lst" or (labels_from == "auto" and lst_path.is_file() and idx_path is not None):
                self.keys, labels = read_lst(lst_path)
                source, unknown = lst_path, np.flatnonzero(~self.reader.has_keys(self.keys))
                if unknown.size or np.unique(self.keys).size != len(self.reader) or len(self.keys) != len(self.reader):
                    raise RecordIOError(lst_path, f"lists {len(self.keys)} keys ({np.unique(self.keys).size} distinct) "
                                        f"but {self.reader.rec_path} holds {len(self.reader)} records"
                                        + (f"; key {self.keys[unknown[0]]} is not in it" if unknown.size else ""))
            else:
                self.keys = np.sort(self.reader.keys)
                source, labels = self.reader.rec_path, _header_labels(self.reader, self.keys)
            bad = np.flatnonzero(~np.isfinite(labels) | (labels < 0) | (labels != np.floor(labels)))
            if bad.size:
                raise RecordIOError(source, f"label {labels[bad[0]]} is not a class index (non-negative integer)",
                                    key=int(self.keys[bad[0]]))
            labels = labels.astype(np.int64)
        self.labels = labels
        self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        self._warned_several = layout != "insightface"  # im2rec: checked above, from the .lst or the headers

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[object, int]:
        key = int(self.keys[index])
        header, image_bytes = self.reader.read_image(key)
        label = first_label(header)
        if header.flag > 1 and not self._warned_several:  # insightface layout: headers are not read at start-up
            self._warned_several = True
            warn_several_labels(self.reader.rec_path, key, header.label)
        if label != self.labels[index]:
            raise RecordIOError(self.reader.rec_path, f"record label {label} disagrees with the dataset's label "
                                f"{self.labels[index]} (from the {self.layout} index); rebuild the files",
                                self.reader.offset(key), key)
        image = decode_image(image_bytes, f"{self.reader.rec_path}, key {key}")
        return (image if self.transform is None else self.transform(image)), int(label)


class SyntheticFaceDataset(Dataset):
    """Random uint8 [3, S, S] images, deterministic per (seed, index), for throughput runs.

    The image of `index` comes from its own generator keyed by (seed, index).

    label(index) = (index * 2654435761 + seed) % num_classes: spread over classes, no storage.
    """

    def __init__(self, num_samples: int, num_classes: int, image_size: int = 112, seed: int = 0,
                 transform: Callable[[Tensor], object] | None = None) -> None:
        if num_samples < 0 or num_classes < 1 or image_size < 1 or seed < 0:
            raise ValueError(f"need num_samples >= 0, num_classes >= 1, image_size >= 1, seed >= 0; got "
                             f"{num_samples}, {num_classes}, {image_size}, {seed}")
        self.num_samples, self.num_classes, self.image_size = num_samples, num_classes, image_size
        self.seed, self.transform = seed, transform

    @property
    def labels(self) -> np.ndarray:
        """int64 [N], the label of every index."""
        return (np.arange(self.num_samples, dtype=np.int64) * 2654435761 + self.seed) % self.num_classes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[object, int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        rng = np.random.default_rng([self.seed, index])  # SeedSequence mixes both: independent streams
        image = torch.from_numpy(rng.integers(0, 256, (3, self.image_size, self.image_size), dtype=np.uint8))
        label = (index * 2654435761 + self.seed) % self.num_classes
        return (image if self.transform is None else self.transform(image)), label


@dataclass(frozen=True)
class PackedFiles:
    """What pack_image_folder wrote."""

    rec_path: Path
    idx_path: Path
    lst_path: Path
    num_images: int
    num_classes: int


def list_image_folder(image_root: str | os.PathLike,
                      identities: Sequence[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """IMAGE_ROOT/<identity>/<image> -> (image paths [N], labels int64 [N], identity names [C]).

    Identities are the sorted subfolder names (label = position), or only the sorted `identities`
    when given (e.g. the training side of an identity-disjoint split); images sorted by name within
    each; files with other extensions and files directly under the root are ignored.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if identities is not None:
        missing = sorted(set(identities) - set(names))
        if missing:
            raise ValueError(f"{root}: no identity subfolder {missing[0]!r} ({len(missing)} of the "
                             f"{len(set(identities))} identities asked for are missing)")
        names = sorted(set(identities))
    paths, labels = [], []
    for label, name in enumerate(names):
        files = sorted(f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images in identity subfolders ({len(names)} subfolders; extensions "
                         f"{IMAGE_EXTENSIONS}); expected IMAGE_ROOT/<identity>/<image>")
    return paths, np.asarray(labels, dtype=np.int64), names


def encode_image_file(path: Path, quality: int = 95, pass_through: bool = False) -> bytes:
    """An image file -> its bytes (pass_through) or RGB JPEG bytes at `quality`."""
    try:
        if pass_through:
            return path.read_bytes()
        with Image.open(path) as img:
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=quality)
            return out.getvalue()
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{path}: cannot read this image ({err}); fix or remove it") from None


def pack_image_folder(image_root: str | os.PathLike, out_prefix: str | os.PathLike, header: bool = False,
                      quality: int = 95, pass_through: bool = False, progress: bool = True,
                      identities: Sequence[str] | None = None) -> PackedFiles:
    """Pack IMAGE_ROOT/<identity>/<image> into OUT_PREFIX.rec/.idx/.lst (all written atomically).

    identities: pack only these subfolders (labels = position in their sorted order); default all.

    header=False: im2rec layout, image keys 0..N-1. header=True: insightface layout (module
    docstring): header record at key 0, images at 1..N, identity records at N+1..N+C.
    Images are re-encoded as JPEG at `quality` unless pass_through keeps the file bytes. Every file is
    stat-ed first (FileImageRecords.check_files), so an empty or unreadable one fails before packing starts;
    the output folder is created when missing.
    """
    from mhe_scale.data.image_folder import FileImageRecords  # image_folder imports this module

    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100 (JPEG), got {quality}")
    paths, labels, names = list_image_folder(image_root, identities)
    FileImageRecords([str(p) for p in paths], labels).check_files()
    num, num_ids = len(paths), len(names)
    if header and num + num_ids + 1 > 1 << 24:
        raise ValueError(f"{num} images + {num_ids} identities: the insightface header stores keys as float32, "
                         "exact only up to 2**24; pack without header=True (im2rec layout) instead")
    prefix = str(out_prefix)
    rec, idx, lst = Path(prefix + ".rec"), Path(prefix + ".idx"), Path(prefix + ".lst")
    if rec.parent.exists() and not rec.parent.is_dir():
        raise NotADirectoryError(f"output folder {rec.parent} is a file; give OUT_PREFIX inside a folder")
    rec.parent.mkdir(parents=True, exist_ok=True)
    first = 1 if header else 0
    lst_file, lst_tmp = open_temp_beside(lst, "x")
    try:
        with RecordIOWriter(rec, idx) as writer, lst_file:
            if header:
                writer.write(0, pack_image_record(IRHeader(2, [num + 1, num + 1 + num_ids], 0, 0), b""))
            for i, path in enumerate(tqdm(paths, desc=f"pack {rec.name}", unit="img", disable=not progress)):
                key, label = first + i, int(labels[i])
                image = encode_image_file(path, quality, pass_through)
                writer.write(key, pack_image_record(IRHeader(0, float(label), key, 0), image))
                relative = path.relative_to(image_root).as_posix()
                if "\t" in relative or "\n" in relative:
                    raise ValueError(f"{path}: tabs and newlines in file names break the .lst format; rename it")
                lst_file.write(f"{key}\t{label:f}\t{relative}\n")
            if header:
                ends = first + np.cumsum(np.bincount(labels, minlength=num_ids))
                starts = np.concatenate([[first], ends[:-1]])
                for j in range(num_ids):
                    key = num + 1 + j
                    writer.write(key, pack_image_record(IRHeader(2, [starts[j], ends[j]], key, 0), b""))
        os.replace(lst_tmp, lst)
    finally:
        Path(lst_tmp).unlink(missing_ok=True)
    return PackedFiles(rec, idx, lst, num, num_ids)
