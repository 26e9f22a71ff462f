"""Decoded + augmented CIFAR-10 images per second: PIL in DataLoader workers vs DALI on CPU.

    python tools/bench_image_pipeline.py CIFAR10_JPEG_DIR CACHE_DIR [--images 5000] [--batch 256]
        [--workers 0 2] [--dali-threads 2] [--split train]

Reads CIFAR10_JPEG_DIR/cifar10-jpeg.tar.gz through its RecordIO cache in CACHE_DIR (built first,
and timed, when missing or stale), then decodes and augments the first N images of the split with
the "cifar" train preset (zero-pad 4 + random 32 crop + flip + normalise) into float32 [B, 3, 32, 32]
batches: PIL (ImageClassificationDataset) under a DataLoader with each --workers count, then DALI's
CPU pipeline (fn.readers.mxnet on the same .rec, --dali-threads threads). Start-up (worker
processes, pipeline build) is timed apart from the pass; images/s counts the pass only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mhe_scale.data.image_archive import archive_records, build_archive_cache, cache_folder
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset


def bench_pil(records, images: int, batch: int, workers: int) -> tuple[float, float]:
    """-> (start-up s, images/s) of one pass over the first `images` records."""
    dataset = Subset(ImageClassificationDataset(records, transform_preset("cifar", True)), range(images))
    start = time.perf_counter()
    it = iter(DataLoader(dataset, batch_size=batch, num_workers=workers))
    first = next(it)[0].shape[0]  # with workers: their start-up and the first batch
    ready = time.perf_counter()
    seen = first + sum(x.shape[0] for x, _ in it)
    end = time.perf_counter()
    assert seen == images
    return ready - start, (images - first) / max(end - ready, 1e-9)


def bench_dali(records, images: int, batch: int, threads: int) -> tuple[float, float]:
    """-> (pipeline build s, images/s) of ceil(images / batch) DALI CPU batches."""
    from mhe_scale.data.dali_image import DALIImageLoader

    start = time.perf_counter()
    loader = DALIImageLoader(records, batch, preset="cifar", train=True, num_threads=threads)
    it = iter(loader)
    first = next(it)[0].shape[0]
    ready = time.perf_counter()
    seen = first
    for _ in range(math.ceil(images / batch) - 1):
        seen += next(it)[0].shape[0]
    end = time.perf_counter()
    return ready - start, (seen - first) / max(end - ready, 1e-9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cifar_dir", type=Path, help="folder holding cifar10-jpeg.tar.gz")
    parser.add_argument("cache_dir", type=Path, help="where the RecordIO cache is (or gets) built")
    parser.add_argument("--images", type=int, default=5000, help="images per measured pass")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--dali-threads", type=int, default=2, help="DALI CPU threads (0 skips DALI)")
    parser.add_argument("--split", default="train")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archive = args.cifar_dir / "cifar10-jpeg.tar.gz"
    torch.set_num_threads(1)
    fresh = not (cache_folder(archive, args.cache_dir) / "manifest.json").is_file()
    start = time.perf_counter()
    build_archive_cache(archive, args.cache_dir)
    built = time.perf_counter() - start
    print(f"cache {cache_folder(archive, args.cache_dir)}: " + (f"built in {built:.1f} s" if fresh else
                                                                 f"reused (checked in {built:.2f} s)"))
    records = archive_records(archive, args.cache_dir, args.split, progress=False)
    images = min(args.images, len(records))
    rows = [(f"PIL, DataLoader num_workers={w}", *bench_pil(records, images, args.batch, w)) for w in args.workers]
    if args.dali_threads > 0:
        try:
            rows.append((f"DALI CPU, {args.dali_threads} threads", *bench_dali(records, images, args.batch,
                                                                               args.dali_threads)))
        except ImportError as err:
            print(f"DALI skipped: {err}")
    print(f"\n{images} images of {args.split}, batch {args.batch}, cifar train preset -> float32 [B, 3, 32, 32]\n")
    print("| pipeline | start-up s | images/s |\n|---|---:|---:|")
    for name, startup, rate in rows:
        print(f"| {name} | {startup:.2f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
