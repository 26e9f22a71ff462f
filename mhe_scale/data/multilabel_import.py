"""What the multi-label importers (tools/import_coco.py, tools/import_voc.py) share: the image root,
the existence check and the seeded validation split; the JSON is written by
multilabel_json.write_multilabel_json (atomically).

The JSON they write (read by data/multilabel_json.py):

    {"classes": [...], "image_root": "../coco/val2017", "images": [["000000000139.jpg", [...]], ...]}

`image_root` is the folder every image path is relative to, written relative to the JSON's own
folder when both lie under one root (else absolute); the reader refuses an entry that resolves
outside it. Entries are checked with safe_paths.resolve_under when imported, so no written path
leaves the root.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mhe_scale.data.multilabel_json import write_multilabel_json
from mhe_scale.data.safe_paths import resolve_under

Record = tuple[str, list[str]]
"""(path relative to the image root, label names) of one image."""


def image_root_entry(images_dir: str | os.PathLike, out_json: str | os.PathLike) -> str:
    """The `image_root` value for images_dir seen from out_json's folder: relative when it can be
    (same drive), else absolute; "." when they are the same folder."""
    images, folder = os.path.abspath(images_dir), os.path.abspath(Path(out_json).parent)
    try:
        return Path(os.path.relpath(images, folder)).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return images


def check_images(images_dir: str | os.PathLike, records: list[Record], wheres: list[str],
                 skip_missing: bool = False) -> tuple[list[Record], int]:
    """(records whose image file exists, how many were missing). Every path must stay under images_dir
    (PathEscapeError naming wheres[i]); a missing image is a ValueError naming how many and the first,
    unless skip_missing, which drops them (the count is returned)."""
    kept, missing = [], []
    for (rel, labels), where in zip(records, wheres):
        if resolve_under(images_dir, rel, where).is_file():
            kept.append((rel, labels))
        else:
            missing.append(where)
    if missing and not skip_missing:
        raise ValueError(f"{len(missing)} of {len(records)} images do not exist under {images_dir} (first: "
                         f"{missing[0]}); fix --images, or pass --skip-missing to drop them")
    return kept, len(missing)


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(rest, held out): round(fraction * N) images drawn without replacement by a seeded permutation,
    each part in the input order. Disjoint by image entry; 0 < fraction < 1 and both parts non-empty."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction {fraction}: must lie strictly between 0 and 1 (e.g. 0.1)")
    count = int(round(fraction * len(records)))
    if count == 0 or count == len(records):
        raise ValueError(f"--val-fraction {fraction} of {len(records)} images leaves an empty split; "
                         "import more images or pick another fraction")
    held = np.zeros(len(records), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(records))[:count]] = True
    return ([r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h])


def val_sibling(out: str | os.PathLike) -> Path:
    """OUT's validation sibling: coco/train.json -> coco/train_val.json."""
    out = Path(out)
    return out.with_name(f"{out.stem}_val{out.suffix or '.json'}")


def write_splits(out: str | os.PathLike, classes: list[str], images_dir: str | os.PathLike, records: list[Record],
                 val_fraction: float | None, seed: int) -> dict[str, tuple[Path, int]]:
    """Write OUT (and, with val_fraction, its `_val` sibling holding the held-out images); returns
    {"out" | "val": (path, images)}. An empty import is refused (ValueError), nothing written."""
    if not records:
        raise ValueError(f"{out}: 0 images to write (every image was dropped, or the input lists none); "
                         "nothing written")
    parts = {"out": (Path(out), records)}
    if val_fraction is not None:
        rest, held = split_validation(records, val_fraction, seed)
        parts = {"out": (Path(out), rest), "val": (val_sibling(out), held)}
    written = {}
    for key, (path, part) in parts.items():
        written[key] = (write_multilabel_json(path, classes, part, image_root=image_root_entry(images_dir, path)),
                        len(part))
    return written
