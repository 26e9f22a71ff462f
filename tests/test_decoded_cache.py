"""data/decoded_cache.py: images decoded once give the same augmented tensors as decoding per access."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mhe_scale.data.decoded_cache import DecodedImageRecords, decode_in_memory
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset
from mhe_scale.data.image_folder import ImageRecords
from mhe_scale.data.two_views import TwoViewDataset, contrastive_transform


class BytesRecords(ImageRecords):
    """In-memory PNG records that count read() calls."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        rng = np.random.default_rng(0)
        self.blobs = []
        for h, w in sizes:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            self.blobs.append(buf.getvalue())
        self.labels, self.classes, self.reads = np.arange(len(sizes), dtype=np.int64) % 3, None, 0

    def read(self, index: int) -> bytes:
        self.reads += 1
        return self.blobs[index]

    def describe(self, index: int) -> str:
        return f"blob {index}"


def test_cached_and_uncached_datasets_give_identical_tensors_without_rereading():
    plain, cached_source = BytesRecords([(32, 32)] * 6), BytesRecords([(32, 32)] * 6)
    cached = decode_in_memory(cached_source, max_mb=1)
    assert isinstance(cached, DecodedImageRecords) and cached.images.shape == (6, 32, 32, 3)
    reads = cached_source.reads
    for make, transform in ((ImageClassificationDataset, transform_preset("cifar", True)),
                            (TwoViewDataset, contrastive_transform("cifar", 2))):
        a, b = make(plain, transform, seed=3), make(cached, transform, seed=3)
        for epoch in (0, 2):
            a.set_epoch(epoch), b.set_epoch(epoch)
            for i in range(6):
                (xa, ya), (xb, yb) = a[i], b[i]
                assert ya == yb and torch.equal(xa, xb)
    assert cached_source.reads == reads  # every access came from the cache: no re-read, no re-decode
    with pytest.raises(ValueError):  # the cache is read-only: a transform cannot corrupt it in place
        cached.decoded(0)[0, 0, 0] = 1


def test_decode_in_memory_falls_back_when_sizes_differ_or_too_large():
    mixed = BytesRecords([(32, 32), (32, 32), (20, 24)])
    assert decode_in_memory(mixed, max_mb=1) is mixed
    big = BytesRecords([(32, 32)] * 4)  # 12 KiB
    assert decode_in_memory(big, max_mb=0.005) is big and big.reads == 1
    assert decode_in_memory(big, max_mb=0) is big
