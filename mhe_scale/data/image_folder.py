"""Where classification images come from: `ImageRecords` = N encoded images + labels int64 [N].

Implementations (all random access, picklable into DataLoader workers, nothing decoded here):
- `folder_records(root)`: ROOT/<class>/<image>; classes = sorted subfolder names, label = position.
- `list_file_records(list_path, root)`: lines `relative/path label` (ImageNet-LT-style subsets);
  paths are relative to `root` and must stay inside it (safe_paths.resolve_under); errors name LIST:line.
  `read_list_lines` parses such a file without touching the images (e.g. reference counts).
- `RecordIOImageRecords(rec, idx)`: an im2rec-packed .rec/.idx (e.g. ImageNet): one image per
  record, label = the IRHeader's float label (its first value when the header holds several).
- the archive cache: `mhe_scale.data.image_archive.archive_records` converts a .tar(.gz) once into
  one RecordIO pair per split and returns a `RecordIOImageRecords` with class names.
`FileImageRecords.check_files()` stats every file at start-up (missing, not a file, or empty) and
refuses with one line counting the bad ones and naming the first few.
File-based records keep their paths in one byte buffer + offsets, not N Python strings, so forked
workers do not copy them page by page through reference counts.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np

from mhe_scale.data.face_dataset import IMAGE_EXTENSIONS, RecordIOFaceDataset
from mhe_scale.data.safe_paths import resolve_under


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

    def file_problem(self, index: int) -> str | None:
        """Why record `index`'s file cannot hold an image ("does not exist", "is empty", ...), or None (one stat)."""
        try:
            info = os.stat(self.path(index))
        except OSError as err:
            return "does not exist" if isinstance(err, (FileNotFoundError, NotADirectoryError)) else \
                f"cannot be read ({err.strerror})"
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        return "is empty (0 bytes)" if info.st_size == 0 else None

    def check_files(self, hint: str = "", shown: int = 3) -> None:
        """Stat every file now (missing, not a file, empty) so a bad one fails at start-up, not when first read:
        FileNotFoundError, one line, counting the bad files and naming the first `shown`; `hint` follows the first."""
        bad: list[tuple[int, str]] = []
        for i in range(len(self)):
            problem = self.file_problem(i)
            if problem is not None:
                bad.append((i, problem))
        if not bad:
            return
        first, problem = bad[0]
        origin = "" if self._origins is None else f"{self._get(*self._origins, first).decode()}: "
        more = "; ".join(f"{self.describe(i)} {p}" for i, p in bad[1:shown]) + ("; ..." if len(bad) > shown else "")
        raise FileNotFoundError(f"{origin}image {self.path(first)} {problem}{hint}; {len(bad):,} of {len(self):,} "
                                f"images are missing or empty" + (f" (also {more})" if more else "")
                                + "; restore them or remove them from the dataset")


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


def read_list_lines(list_path: str | os.PathLike) -> list[tuple[int, str, int]]:
    """Lines `relative/path label` (label a non-negative integer; the path may hold spaces, the label is
    the last field; blank lines skipped) -> [(line number, relative path, label)]; the images are not touched.

    Errors (ValueError) name LIST:line: a line of another shape, an absolute path, bytes that are not
    UTF-8 text (a binary file given as a list).
    """
    out: list[tuple[int, str, int]] = []
    with open(list_path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{list_path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); is this a list file of 'relative/path label' lines?") from None
            if not line.strip():
                continue
            fields = line.strip().rsplit(maxsplit=1)
            if (len(fields) != 2 or not fields[1].isdigit() or "\0" in line or os.path.isabs(fields[0])
                    or fields[0].startswith("~")):
                raise ValueError(f"{list_path}:{number}: expected 'relative/path label' (label a non-negative "
                                 f"integer, path relative to the list's root), got {line.rstrip()[:100]!r}")
            out.append((number, fields[0], int(fields[1])))
    return out


def list_file_records(list_path: str | os.PathLike, root: str | os.PathLike,
                      check_exists: bool = True) -> FileImageRecords:
    """Lines of `read_list_lines` -> FileImageRecords over ROOT/relative/path.

    Every path must stay inside ROOT (`..` that leaves it: PathEscapeError naming LIST:line).
    check_exists: stat every file now (FileImageRecords.check_files), so missing or empty images fail at
    start-up, counted, the first named with its LIST:line.
    """
    list_path, root = Path(list_path), Path(root)
    paths: list[str] = []
    labels: list[int] = []
    origins: list[str] = []
    base = os.path.normpath(os.path.abspath(root))
    for number, relative, label in read_list_lines(list_path):
        where = f"{list_path}:{number}"
        # read_list_lines refused absolute and ~ paths, so only a `..` component can leave the root: the
        # full check (resolve_under) for those, a plain string join for the rest (no pathlib per line)
        paths.append(str(resolve_under(base, relative, where)) if ".." in relative else os.path.join(base, relative))
        labels.append(label)
        origins.append(where)
    if not paths:
        raise ValueError(f"{list_path}: no 'relative/path label' lines")
    records = FileImageRecords(paths, np.asarray(labels, dtype=np.int64), None, origins)
    if check_exists:
        records.check_files(f" (is root={root} the folder the list's paths are relative to?)")
    return records


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
