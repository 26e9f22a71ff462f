"""Decode a small image set once into one in-memory uint8 array (CIFAR-sized data sets).

`decode_in_memory(records, max_mb)` -> `DecodedImageRecords` (same labels, classes, read, describe,
plus `decoded(i)` -> uint8 [H, W, 3], a read-only view) when every image decodes to the same shape
and the array fits in `max_mb` MiB; otherwise the records unchanged. The datasets
(data/image_dataset.py, data/two_views.py) take `decoded(i)` instead of decoding `read(i)` again, so
each image is decoded once per process instead of once per access (per epoch, per view, per
kNN bank pass); DataLoader workers started by fork share the array copy-on-write.
The augmentation is unchanged: the transforms receive the same uint8 array decode_rgb returns.
"""

from __future__ import annotations

import logging

import numpy as np

from mhe_scale.data.image_folder import ImageRecords
from mhe_scale.data.image_transforms import decode_rgb

logger = logging.getLogger(__name__)


class DecodedImageRecords(ImageRecords):
    """`records` with all images decoded: images uint8 [N, H, W, 3] (read-only)."""

    def __init__(self, records: ImageRecords, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[0] != len(records) or images.dtype != np.uint8:
            raise ValueError(f"decoded images {images.shape} {images.dtype} do not match {len(records)} records")
        self.source, self.images = records, images
        self.images.flags.writeable = False
        self.labels, self.classes = records.labels, getattr(records, "classes", None)

    def read(self, index: int) -> bytes:
        return self.source.read(index)

    def describe(self, index: int) -> str:
        return self.source.describe(index)

    def decoded(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] of record `index` (read-only view of the cache)."""
        return self.images[index]


def decode_in_memory(records: ImageRecords, max_mb: float) -> ImageRecords:
    """DecodedImageRecords of records when they fit (module docstring), else records unchanged."""
    if max_mb <= 0 or len(records) == 0 or isinstance(records, DecodedImageRecords):
        return records
    first = decode_rgb(records.read(0), records.describe(0))
    size_mb = len(records) * first.nbytes / 2**20
    if size_mb > max_mb:
        logger.info("not caching decoded images: %.0f MiB > data.decoded_cache_mb=%s", size_mb, max_mb)
        return records
    images = np.empty((len(records), *first.shape), dtype=np.uint8)
    images[0] = first
    for i in range(1, len(records)):
        image = decode_rgb(records.read(i), records.describe(i))
        if image.shape != first.shape:
            logger.info("not caching decoded images: %s is %s, record 0 is %s", records.describe(i), image.shape,
                        first.shape)
            return records
        images[i] = image
    return DecodedImageRecords(records, images)
