"""Multi-label image annotations: one JSON per split, and the dataset that serves them.

    {"classes": ["cat", "dog", ...], "images": [["relative/path.jpg", ["dog", "cat"]], ...],
     "image_root": "../images"}

Image paths are relative to the image root: the optional top-level "image_root" (a folder, relative
to the JSON's folder or absolute; absent: the JSON's folder), or the `image_root` argument
(data.image_root), which overrides it. Every path must stay inside the root: an absolute path or one
whose `..` leaves it is refused naming the file and the entry (safe_paths.resolve_under). Class index = position in sorted(classes), so logits,
`thresholds.npy` and every per-class metric follow that order whatever order the file lists them
in. A label repeated in one image counts once; an image with no label is kept (all negative); a
label that `classes` does not name is an error naming the file and the image, unless
`drop_unknown=True`, which drops such labels and counts them.

`MultilabelImageDataset(annotations, transform, seed)[i]` -> (image float32 [3, H, W], multi-hot
float32 [C]); augmentation is per sample as in data/image_dataset.py (seeded by seed, epoch, index).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mhe_scale.data.image_dataset import ImageClassificationDataset
from mhe_scale.data.image_folder import FileImageRecords
from mhe_scale.data.image_transforms import Transform
from mhe_scale.data.safe_paths import resolve_under


@dataclass(frozen=True)
class MultilabelAnnotations:
    """One split: `paths` [N] image files (absolute), `targets` bool [N, C] in sorted-class order;
    `image_root` the folder every path lies in."""

    source: str
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    dropped_labels: int = 0
    image_root: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def records(self) -> FileImageRecords:
        """The images as FileImageRecords (label = the image's first class, or -1: unused by training)."""
        first = np.where(self.targets.any(1), self.targets.argmax(1), -1)
        origins = [f"{self.source}: images[{i}]" for i in range(len(self.paths))]
        return FileImageRecords(self.paths, first, self.classes, origins)


def _fail(path: Path, where: str, message: str) -> ValueError:
    return ValueError(f"{path}: {where}: {message}")


def _image_root(path: Path, raw: dict, override: str | os.PathLike | None) -> Path:
    """The folder the image paths start from: override, else the JSON's "image_root" (relative to its folder)."""
    if override is not None:
        root = Path(override)
        where = f"image_root {root} (data.image_root)"
    else:
        given = raw.get("image_root")
        if given is None:
            return path.parent
        if not isinstance(given, str) or not given:
            raise _fail(path, "image_root", f"must be a folder name (a non-empty string), got {str(given)[:60]}")
        root = path.parent / os.path.expanduser(given)
        where = f"image_root {given!r}"
    if not root.is_dir():
        raise _fail(path, where, f"{root} is not a folder; point image_root at the folder the image paths start from")
    return Path(os.path.normpath(os.path.abspath(root)))


def read_multilabel_json(path: str | os.PathLike, drop_unknown: bool = False, check_exists: bool = False,
                         image_root: str | os.PathLike | None = None) -> MultilabelAnnotations:
    """Read one split's JSON (module docstring). Errors name the file and the image entry.

    image_root: overrides the file's "image_root". check_exists: stat every image now
    (FileImageRecords.check_files: the bad ones counted, the first few named).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"multi-label annotations {path} do not exist") from None
    except UnicodeDecodeError as err:
        raise _fail(path, f"byte {err.start}", "not UTF-8 text; is this a multi-label JSON?") from None
    except json.JSONDecodeError as err:
        raise _fail(path, f"line {err.lineno}", f"not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not isinstance(raw.get("images"), list):
        raise _fail(path, "top level", 'expected {"classes": [names], "images": [[path, [labels]], ...]}')
    names = raw["classes"]
    if not all(isinstance(c, str) for c in names) or len(set(names)) != len(names) or not names:
        raise _fail(path, "classes", "must be a non-empty list of distinct strings")
    classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    root = _image_root(path, raw, image_root)
    paths: list[str] = []
    targets = np.zeros((len(raw["images"]), len(classes)), dtype=bool)
    dropped = 0
    for i, entry in enumerate(raw["images"]):
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list) or not all(isinstance(x, str) for x in entry[1])):
            raise _fail(path, f"images[{i}]", f"expected [relative_path, [label, ...]], got {str(entry)[:100]}")
        rel, labels = entry
        full = resolve_under(root, rel, f"{path}: images[{i}]")
        for label in labels:
            if label in index:
                targets[i, index[label]] = True
            elif drop_unknown:
                dropped += 1
            else:
                raise _fail(path, f"images[{i}] ({rel})", f"label {label!r} is not in classes; add it to "
                            "classes or pass drop_unknown (data.drop_unknown_labels=true) to drop such labels")
        paths.append(str(full))
    annotations = MultilabelAnnotations(str(path), classes, paths, targets, dropped, str(root))
    if check_exists:
        annotations.records().check_files(f" (image_root {root})")
    return annotations


def write_multilabel_json(path: str | os.PathLike, classes: list[str], images: list[tuple[str, list[str]]],
                          image_root: str | None = None) -> Path:
    """Write one split; image paths must already be relative to the image root: `image_root` (written as the
    top-level key: relative to path's folder, or absolute) or, when None, path's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body: dict = {"classes": list(classes)}
    if image_root is not None:
        body["image_root"] = str(image_root)
    body["images"] = [[p, list(labels)] for p, labels in images]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:  # atomic: a temporary file in the same folder, fsynced, renamed
        f.write(json.dumps(body, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class MultilabelImageDataset(ImageClassificationDataset):
    """(image float32 [3, H, W], multi-hot float32 [C]) per image of `annotations` (module docstring)."""

    def __init__(self, annotations: MultilabelAnnotations, transform: Transform | None = None, seed: int = 0) -> None:
        super().__init__(annotations.records(), transform, seed)
        self.annotations = annotations
        self.targets = torch.from_numpy(annotations.targets.astype(np.float32))

    @property
    def num_classes(self) -> int:
        return self.annotations.num_classes

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        image, _ = super().__getitem__(index)
        i = int(index[1]) if isinstance(index, tuple) else int(index)
        return image, self.targets[i]
