"""Where classification images come from: `ImageRecords` = N encoded images + labels int64 [N].

Implementations (all random access, picklable into DataLoader workers, nothing decoded here):
- `folder_records(root)`: ROOT/<class>/<image>; classes = sorted subfolder names, label = position.
- `list_file_records(list_path, root)`: lines `relative/path label` (ImageNet-LT-style subsets);
  paths are relative to `root`; errors name LIST:line.
- `RecordIOImageRecords(rec, idx)`: an im2rec-packed .rec/.idx (e.g. ImageNet): one image per
  record, label = the IRHeader's float label (its first value when the header holds several).
- the archive cache: `mhe_scale.data.image_archive.archive_records` converts a .tar(.gz) once into
  one RecordIO pair per split and returns a `RecordIOImageRecords` with class names.
File-based records keep their paths in one byte buffer + offsets, not N Python strings, so forked
workers do not copy them page by page through reference counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mhe_scale.data.face_dataset import IMAGE_EXTENSIONS, RecordIOFaceDataset


class ImageRecords:
    """N encoded images with int64 labels [N]; `classes` names the labels when known (else None)."""

    labels: np.ndarray
    classes: list[str] | None

    @property
    def num_classes(self) -> int:
        """len(classes) when known, else max label + 1."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> bytes:
        """The encoded image (JPEG/PNG/... bytes) of record `index` in [0, N)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where record `index` lives, for error messages (a file path, or .rec + key)."""
        raise NotImplementedError


class FileImageRecords(ImageRecords):
    """Images stored one per file. `paths` [N] absolute (or root-relative joined) file paths.

    Args:
        paths: the image files, in dataset order. labels: int [N], >= 0.
        classes: label names or None. origins: per image, where it was listed (e.g. "list.txt:12")
            for error messages; None when the path itself says it all.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, classes: list[str] | None = None,
                 origins: list[str] | None = None) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._origins = None if origins is None else FileImageRecords._pack(origins)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    @staticmethod
    def _pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [s.encode() for s in strings]
        return np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([len(e) for e in encoded], dtype=np.int64)

    @staticmethod
    def _get(blob: np.ndarray, ends: np.ndarray, index: int) -> bytes:
        start = int(ends[index - 1]) if index > 0 else 0
        return blob[start:int(ends[index])].tobytes()

    def path(self, index: int) -> str:
        """The file of record `index`."""
        return os.fsdecode(self._get(self._blob, self._ends, index))

    def describe(self, index: int) -> str:
        where = self.path(index)
        if self._origins is not None:
            where += f" (listed at {self._get(*self._origins, index).decode()})"
        return where

    def read(self, index: int) -> bytes:
        try:
            with open(self.path(index), "rb") as f:
                return f.read()
        except OSError as err:
            raise FileNotFoundError(f"{self.describe(index)}: cannot read the image ({err.strerror}); "
                                    "restore the file or remove it from the dataset") from None


def folder_records(root: str | os.PathLike) -> FileImageRecords:
    """ROOT/<class>/<image> -> FileImageRecords; classes sorted, label = position in them.

    Images are sorted by name within a class; other extensions and files directly under ROOT are
    ignored (extensions: face_dataset.IMAGE_EXTENSIONS, any case).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f.name for f in os.scandir(root / name)
                       if f.is_file() and os.path.splitext(f.name)[1].lower() in IMAGE_EXTENSIONS)
        paths += [str(root / name / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root} holds no images in class subfolders ({len(classes)} subfolders, extensions "
                         f"{IMAGE_EXTENSIONS}); expected ROOT/<class>/<image>")
    return FileImageRecords(paths, np.asarray(labels, dtype=np.int64), classes)


def list_file_records(list_path: str | os.PathLike, root: str | os.PathLike,
                      check_exists: bool = True) -> FileImageRecords:
    """Lines `relative/path label` (label a non-negative integer; the path may hold spaces, the label
    is the last field; blank lines skipped) -> FileImageRecords over ROOT/relative/path.

    check_exists: stat every file now, so a missing one fails at start-up naming LIST:line.
    """
    list_path, root = Path(list_path), Path(root)
    paths: list[str] = []
    labels: list[int] = []
    origins: list[str] = []
    with open(list_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().rsplit(maxsplit=1)
            if len(fields) != 2 or not fields[1].isdigit() or os.path.isabs(fields[0]):
                raise ValueError(f"{list_path}:{number}: expected 'relative/path label' (label a non-negative "
                                 f"integer, path relative to {root}), got {line.rstrip()[:100]!r}")
            path = root / fields[0]
            if check_exists and not path.is_file():
                raise FileNotFoundError(f"{list_path}:{number}: image {path} does not exist (is root={root} "
                                        "the folder the list's paths are relative to?)")
            paths.append(str(path))
            labels.append(int(fields[1]))
            origins.append(f"{list_path}:{number}")
    if not paths:
        raise ValueError(f"{list_path}: no 'relative/path label' lines")
    return FileImageRecords(paths, np.asarray(labels, dtype=np.int64), None, origins)


class RecordIOImageRecords(ImageRecords):
    """One image per record of an im2rec-layout .rec/.idx (ImageNet as MXNet's im2rec packs it).

    Records are taken in key order; labels int64 [N] come from PREFIX.lst when it sits beside the
    .rec, else from each record's IRHeader (first value; must be a non-negative integer).
    `classes`: names from `classes_json` (a JSON list) when given.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike,
                 classes_json: str | os.PathLike | None = None) -> None:
        records = RecordIOFaceDataset(rec_path, idx_path, layout="im2rec")
        self.reader, self.keys, self.labels = records.reader, records.keys, records.labels
        self.classes = None
        if classes_json is not None:
            classes = json.loads(Path(classes_json).read_text())
            if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
                raise ValueError(f"{classes_json}: expected a JSON list of class names")
            if len(self.labels) and self.labels.max() >= len(classes):
                raise ValueError(f"{rec_path} holds label {self.labels.max()} but {classes_json} names only "
                                 f"{len(classes)} classes; rebuild the cache")
            self.classes = classes

    @property
    def rec_path(self) -> Path:
        return self.reader.rec_path

    @property
    def idx_path(self) -> Path:
        return self.reader.idx_path

    def describe(self, index: int) -> str:
        return f"{self.reader.rec_path}, record key {int(self.keys[index])}"

    def read(self, index: int) -> bytes:
        return self.reader.read_image(int(self.keys[index]))[1]
