"""An image archive (.tar, .tar.gz: members `<split>/<class>/<file>`) as an indexed RecordIO cache.

A gzip stream is not seekable, and unpacking CIFAR-10's 60,000 JPEGs into files is slow and
clutters file systems. So `build_archive_cache` reads the archive ONCE, sequentially, and writes
per split `<split>.rec` + `<split>.idx` (im2rec layout: key = position in the split, IRHeader label
= class index) plus one `classes.json` (class names of all splits, sorted; label = position) and
`manifest.json` (the archive's path, size, mtime_ns, options, record counts per split, and images
per split that limit_per_class dropped). Reads are then
random access through the .idx (`RecordIOImageRecords`); DALI reads the same files with
`fn.readers.mxnet`.

Atomic: everything is written into a temporary folder beside the cache folder and renamed onto it
when complete; a cache whose manifest does not match the archive (size, mtime, options) is rebuilt.
Member order: records keep the archive's order within a split; provisional labels (first-seen
class order) are rewritten to sorted order in one extra local pass only when the two differ.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import IO

from tqdm import tqdm

from mhe_scale.data.face_dataset import IMAGE_EXTENSIONS
from mhe_scale.data.image_folder import RecordIOImageRecords
from mhe_scale.data.recordio import IRHeader, RecordIOReader, RecordIOWriter, pack_image_record, unpack_image_record

CACHE_FORMAT = 1


class _ProgressReader:
    """A binary file whose reads advance a tqdm bar by the bytes read (compressed bytes)."""

    def __init__(self, raw: IO[bytes], bar: tqdm) -> None:
        self.raw, self.bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bar.update(len(data))
        return data


def cache_folder(archive: str | os.PathLike, cache_dir: str | os.PathLike, limit_per_class: int | None = None) -> Path:
    """CACHE_DIR/<archive name without .tar/.tar.gz/.tgz>[-limitN]: where the cache of `archive` lives."""
    name = Path(archive).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(cache_dir) / (name + (f"-limit{limit_per_class}" if limit_per_class is not None else ""))


def _stamp(archive: Path, limit_per_class: int | None, strip_components: int) -> dict:
    stat = archive.stat()
    return {"format": CACHE_FORMAT, "archive": str(archive.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "limit_per_class": limit_per_class, "strip_components": strip_components}


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(manifest: dict | None, stamp: dict) -> bool:
    return manifest is not None and all(manifest.get(k) == v for k, v in stamp.items())


def _convert(archive: Path, out: Path, limit_per_class: int | None, strip_components: int,
             progress: bool, dropped: dict[str, int]) -> dict[str, int]:
    """Stream the archive once into out/<split>.rec/.idx (provisional labels) -> records per split;
    `dropped` gets the images per split that limit_per_class left out."""
    writers: dict[str, RecordIOWriter] = {}
    counts: dict[tuple[str, str], int] = {}
    per_split: dict[str, int] = {}
    class_ids: dict[str, int] = {}
    total = archive.stat().st_size
    try:
        with open(archive, "rb") as raw, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                              desc=f"cache {archive.name}") as bar, \
                tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")][strip_components:]
                if not member.isfile() or os.path.splitext(member.name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                if len(parts) != 3:
                    raise ValueError(f"{archive}: member {member.name!r} is not <split>/<class>/<file> after "
                                     f"dropping {strip_components} leading folder(s); set strip_components")
                split, name = parts[0], parts[1]
                seen = counts.get((split, name), 0)
                if limit_per_class is not None and seen >= limit_per_class:
                    dropped[split] = dropped.get(split, 0) + 1
                    continue
                counts[(split, name)] = seen + 1
                label = class_ids.setdefault(name, len(class_ids))
                if split not in writers:
                    writers[split] = RecordIOWriter(out / f"{split}.rec", out / f"{split}.idx")
                handle = tar.extractfile(member)
                key = per_split.get(split, 0)
                per_split[split] = key + 1
                writers[split].write(key, pack_image_record(IRHeader(0, float(label), key, 0), handle.read()))
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if not writers:
        raise ValueError(f"{archive}: no image members (<split>/<class>/<file> with extensions {IMAGE_EXTENSIONS})")
    classes = sorted(class_ids)
    if list(class_ids) != classes:  # relabel: provisional (first seen) -> position in sorted names
        remap = {class_ids[c]: i for i, c in enumerate(classes)}
        for split in writers:
            _relabel(out / f"{split}.rec", out / f"{split}.idx", remap)
    (out / "classes.json").write_text(json.dumps(classes))
    return dict(sorted(per_split.items()))


def _relabel(rec: Path, idx: Path, remap: dict[int, int]) -> None:
    """Rewrite each record's IRHeader label through `remap` (one sequential local pass)."""
    reader = RecordIOReader(rec, idx)
    with RecordIOWriter(rec, idx) as writer:  # temp files beside, renamed over the originals at close
        for key, payload in reader:
            header, image = unpack_image_record(payload, path=rec, key=key)
            writer.write(key, pack_image_record(header._replace(label=float(remap[int(header.label)])), image))
    reader.close()


def build_archive_cache(archive: str | os.PathLike, cache_dir: str | os.PathLike, *,
                        limit_per_class: int | None = None, strip_components: int = 0,
                        progress: bool = True) -> Path:
    """Convert `archive` once into its cache folder (module docstring) and return that folder.

    Reuses an existing cache whose manifest matches the archive's size, mtime and these options.
    limit_per_class: keep only the first N images of each (split, class), for small test caches
        (the whole stream is still read). strip_components: leading folders to drop from member names.
    Several processes may call this at once: each builds its own temporary folder, the first
    rename wins, the others discard theirs (on a cluster, let one rank build and the others wait).
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be >= 1 or None, got {limit_per_class}")
    folder = cache_folder(archive, cache_dir, limit_per_class)
    stamp = _stamp(archive, limit_per_class, strip_components)
    if _matches(read_manifest(folder), stamp):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        dropped: dict[str, int] = {}
        splits = _convert(archive, tmp, limit_per_class, strip_components, progress, dropped)
        dropped = {split: dropped.get(split, 0) for split in splits}
        (tmp / "manifest.json").write_text(json.dumps({**stamp, "splits": splits, "dropped": dropped}, indent=1))
        if folder.exists():  # stale (archive changed) or half-deleted: move aside, then replace
            if _matches(read_manifest(folder), stamp):
                return folder  # another process finished first
            stale = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.stale")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _matches(read_manifest(folder), stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def archive_records(archive: str | os.PathLike, cache_dir: str | os.PathLike, split: str, *,
                    limit_per_class: int | None = None, strip_components: int = 0,
                    progress: bool = True) -> RecordIOImageRecords:
    """The records of `split` (e.g. "train", "test") of `archive`, building its cache if needed."""
    folder = build_archive_cache(archive, cache_dir, limit_per_class=limit_per_class,
                                 strip_components=strip_components, progress=progress)
    splits = read_manifest(folder)["splits"]
    if split not in splits:
        raise KeyError(f"{archive} has no split {split!r}; it holds {sorted(splits)}")
    return RecordIOImageRecords(folder / f"{split}.rec", folder / f"{split}.idx", folder / "classes.json")
