"""The data section of the image tasks and the functions that turn it into train / test records
(`image_records`; `task_records` for a training task: cache built by one process, small sets decoded once).

    data.format = archive   data.path = a .tar(.gz) of <split>/<class>/<file> images (CIFAR-10 jpeg),
                            converted once into an indexed RecordIO cache (data/image_archive.py)
                  folder    data.path / data.test_path = folder-per-class roots
                  list      data.path / data.test_path = 'relative/path label' list files under data.root
                            (data.test_root for the test list); a path leaving its root is refused
                  recordio  data.path / data.test_path = im2rec .rec files (.idx beside them)

At start-up every image file (folder, list) is stat-ed and missing or empty ones refused in one line
(data.check_images); a .rec must hold every record its .idx points at (data/recordio.py). The archive
cache lives in data.cache_dir (default ~/.cache/mhe_scale/images).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mhe_scale.data.decoded_cache import decode_in_memory
from mhe_scale.data.image_folder import ImageRecords, folder_records, list_file_records, RecordIOImageRecords

FORMATS = ("archive", "folder", "list", "recordio")


@dataclass(kw_only=True)
class ImageDataConfig:
    """data section of the image tasks (classify, ...)."""

    name: str = "cifar10"
    """A label for the dataset in tables and logs."""
    format: str = "archive"
    """archive | folder | list | recordio (see mhe_scale/data/image_source.py)."""
    path: Optional[str] = None
    """Training images: the archive, the train folder, the train list file or the train .rec."""
    test_path: Optional[str] = None
    """Test images (folder / list / recordio); unused by archive, which holds both splits."""
    root: Optional[str] = None
    """list: folder the list's relative paths start from (default: the list file's folder); a path that
    leaves it is refused."""
    test_root: Optional[str] = None
    """list: folder the test list's paths start from (default: data.root, else the train list's folder)."""
    train_split: str = "train"
    """archive: the split used for training."""
    test_split: str = "test"
    """archive: the split used for evaluation."""
    cache_dir: Optional[str] = None
    """archive: where the converted RecordIO cache goes (default ~/.cache/mhe_scale/images)."""
    limit_per_class: Optional[int] = None
    """archive: keep only the first N images of each class and split (smoke runs and tests); the test split
    shrinks too (a note says by how much: test metrics are then on that subset). Refused for the other
    formats (it was ignored there without a word)."""
    check_images: bool = True
    """folder / list: stat every image file at start-up and refuse missing or empty ones (one line: how many,
    the first few named); false: a bad image fails only when first read (e.g. millions of files on a slow
    network file system)."""
    num_classes: Optional[int] = None
    """Classes the head is built for (default: the number of classes found in the training records)."""
    preset: str = "cifar"
    """Augmentation family: cifar (crop 32 after 4-pixel padding + flip) | imagenet (RandomResizedCrop + flip;
    eval resize + centre crop)."""
    image_size: Optional[int] = None
    """Side of the training crops (default: the preset's, 32 or 224)."""
    sampler: str = "epoch"
    """Training order: epoch | class_balanced | repeated_aug | m_per_class (mhe_scale/data/samplers.py)."""
    seed: int = 0
    """Seed of the per-sample augmentation (with the epoch and the index)."""
    decoded_cache_mb: float = 1024
    """Decode all images once into memory when they share one size and fit in this many MiB (CIFAR-10:
    146 MiB for 50,000; the same samples as decoding at each access); 0 decodes on every access
    (data/decoded_cache.py). Every image task (classify, multigrain, contrastive, probe) uses it."""


def _resolve(path: Optional[str], key: str) -> Path:
    from mhe_scale.tasks.paths import config_path_candidates

    if not path:
        raise ValueError(f"{key} is not set; point it at the images (see mhe_scale/data/image_source.py)")
    for candidate in config_path_candidates(path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{key}={path!r} does not exist (tried {' and '.join(map(str, config_path_candidates(path)))})")


def image_records(cfg: ImageDataConfig, progress: bool = True) -> tuple[ImageRecords, ImageRecords]:
    """(train, test) records of the data section; errors name the key and the fix."""
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format!r} is not known; choose one of {FORMATS}")
    if cfg.limit_per_class is not None and (cfg.format != "archive" or cfg.limit_per_class < 1):
        raise ValueError(f"data.limit_per_class={cfg.limit_per_class}: " + (
            "must be >= 1" if cfg.format == "archive" else
            f"only data.format=archive takes it (with {cfg.format} every image would be used); write a shorter "
            f"{'list' if cfg.format == 'list' else 'folder or .rec'} for a small run, or drop the key"))
    path = _resolve(cfg.path, "data.path")
    if cfg.format == "archive":
        from mhe_scale.data.image_archive import archive_records

        cache = cfg.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mhe_scale", "images")
        try:
            pair = tuple(archive_records(path, cache, split, limit_per_class=cfg.limit_per_class,
                                         progress=progress) for split in (cfg.train_split, cfg.test_split))
        except KeyError as exc:  # a missing split: say which key picks it
            raise ValueError(f"data.train_split / data.test_split: {exc.args[0]}") from None
        if progress and cfg.limit_per_class is not None:
            note = limit_note(path, cache, cfg.limit_per_class, cfg.test_split)
            if note:
                print(note, file=sys.stderr)
        return pair  # type: ignore[return-value]
    test = _resolve(cfg.test_path, "data.test_path")
    if cfg.format == "folder":
        pair = folder_records(path), folder_records(test)
        if cfg.check_images:
            for records in pair:
                records.check_files()
        return pair
    if cfg.format == "list":
        root = Path(cfg.root) if cfg.root else path.parent
        test_root = Path(cfg.test_root) if cfg.test_root else root
        return (list_file_records(path, root, check_exists=cfg.check_images),
                list_file_records(test, test_root, check_exists=cfg.check_images))
    return (RecordIOImageRecords(path, path.with_suffix(".idx")),
            RecordIOImageRecords(test, test.with_suffix(".idx")))


def limit_note(archive: Path, cache_dir: str | os.PathLike, limit: int, split: str) -> str | None:
    """One line when data.limit_per_class dropped images of the test `split` (None when it dropped none)."""
    from mhe_scale.data.image_archive import cache_folder, read_manifest

    manifest = read_manifest(cache_folder(archive, cache_dir, limit)) or {}
    kept, dropped = manifest.get("splits", {}).get(split), manifest.get("dropped", {}).get(split)
    if kept is None or dropped == 0:
        return None
    total = f"{kept:,} of {kept + dropped:,}" if dropped is not None else f"{kept:,}"
    return (f"note: data.limit_per_class={limit} applies to the test split too: it keeps {total} "
            f"{split!r} images ({limit} per class), and every test metric is computed on them")


def task_records(cfg: ImageDataConfig, accelerator: Any = None) -> tuple[ImageRecords, ImageRecords]:
    """(train, test) records for a training task: under `accelerator` one process builds an archive's cache
    first and the others then read it; then every process decodes small image sets once into memory
    (data.decoded_cache_mb, data/decoded_cache.py)."""
    if accelerator is None:
        pair = image_records(cfg)
    else:
        with accelerator.main_process_first():
            pair = image_records(cfg, progress=accelerator.is_local_main_process)
    train, test = (decode_in_memory(r, cfg.decoded_cache_mb) for r in pair)
    return train, test
