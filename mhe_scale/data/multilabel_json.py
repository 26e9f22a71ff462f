"""Multi-label image annotations: one JSON per split, and the dataset that serves them.

    {"classes": ["cat", "dog", ...], "images": [["relative/path.jpg", ["dog", "cat"]], ...]}

Paths are relative to the JSON's folder. Class index = position in sorted(classes), so logits,
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


@dataclass(frozen=True)
class MultilabelAnnotations:
    """One split: `paths` [N] image files (absolute), `targets` bool [N, C] in sorted-class order."""

    source: str
    classes: list[str]
    paths: list[str]
    targets: np.ndarray
    dropped_labels: int = 0

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


def read_multilabel_json(path: str | os.PathLike, drop_unknown: bool = False,
                         check_exists: bool = False) -> MultilabelAnnotations:
    """Read one split's JSON (module docstring). Errors name the file and the image entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"multi-label annotations {path} do not exist") from None
    except json.JSONDecodeError as err:
        raise _fail(path, f"line {err.lineno}", f"not valid JSON ({err.msg})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not isinstance(raw.get("images"), list):
        raise _fail(path, "top level", 'expected {"classes": [names], "images": [[path, [labels]], ...]}')
    names = raw["classes"]
    if not all(isinstance(c, str) for c in names) or len(set(names)) != len(names) or not names:
        raise _fail(path, "classes", "must be a non-empty list of distinct strings")
    classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    root = path.parent
    paths: list[str] = []
    targets = np.zeros((len(raw["images"]), len(classes)), dtype=bool)
    dropped = 0
    for i, entry in enumerate(raw["images"]):
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list) or not all(isinstance(x, str) for x in entry[1])):
            raise _fail(path, f"images[{i}]", f"expected [relative_path, [label, ...]], got {str(entry)[:100]}")
        rel, labels = entry
        if os.path.isabs(rel):
            raise _fail(path, f"images[{i}] ({rel})", "the path must be relative to the JSON's folder")
        for label in labels:
            if label in index:
                targets[i, index[label]] = True
            elif drop_unknown:
                dropped += 1
            else:
                raise _fail(path, f"images[{i}] ({rel})", f"label {label!r} is not in classes; add it to "
                            "classes or pass drop_unknown (data.drop_unknown_labels=true) to drop such labels")
        full = root / rel
        if check_exists and not full.is_file():
            raise _fail(path, f"images[{i}]", f"image {full} does not exist")
        paths.append(str(full))
    return MultilabelAnnotations(str(path), classes, paths, targets, dropped)


def write_multilabel_json(path: str | os.PathLike, classes: list[str], images: list[tuple[str, list[str]]]) -> Path:
    """Write one split; image paths must already be relative to path's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"classes": list(classes), "images": [[p, list(labels)] for p, labels in images]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(path)
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
