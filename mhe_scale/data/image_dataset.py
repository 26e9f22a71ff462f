"""Image classification dataset over `ImageRecords`, with per-sample reproducible augmentation.

`ImageClassificationDataset(records, transform, seed)[i]` -> (image float32 [3, H, W], label int;
the default collate stacks labels into int64 [B]). Sample i of epoch e is augmented with its own
`numpy.random.default_rng([seed, e, i])`, so what a sample looks like depends only on
(seed, epoch, index): the same with 0 or 8 DataLoader workers, any batch order, after a resume.
The epoch reaches the workers in one of two ways:
- `dataset.set_epoch(e)` before iterating the loader: the epoch lives in a shared-memory tensor,
  so persistent workers (the engine's DataLoader) see it too;
- an index `(e, i)` instead of `i` (a batch sampler yielding such pairs overrides set_epoch).
Decoding happens in the worker processes (PIL); `transform_preset` builds the usual pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mhe_scale.data.image_folder import ImageRecords
from mhe_scale.data.image_transforms import (Compose, Normalize, RandomCropPad, RandomHorizontalFlip,
                                             RandomResizedCrop, ResizeCenterCrop, ToTensor, Transform, decode_rgb)

# per-channel RGB statistics of the training images, in [0, 1] units
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESETS = ("cifar", "imagenet")
PRESET_DEFAULTS: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {
    "cifar": (32, CIFAR10_MEAN, CIFAR10_STD), "imagenet": (224, IMAGENET_MEAN, IMAGENET_STD)}
"""Per preset: (training image side when data.image_size is unset, mean, std)."""


def transform_preset(name: str, train: bool, *, size: int | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Compose:
    """The usual augmentation of a dataset family, uint8 [H, W, 3] -> float32 [3, S, S] normalised.

    cifar: train = random crop S (32) after 4-pixel zero padding + flip p=0.5; eval = as is.
    imagenet: train = RandomResizedCrop S (224), scale (0.08, 1), ratio (3/4, 4/3) + flip;
        eval = resize shorter side to S * 256/224, centre crop S.
    mean/std default to the family's (CIFAR-10, ImageNet) statistics.
    """
    if name not in PRESET_DEFAULTS:
        raise ValueError(f"unknown transform preset {name!r}; choose one of {PRESETS}")
    default_size, default_mean, default_std = PRESET_DEFAULTS[name]
    size, mean, std = size or default_size, mean or default_mean, std or default_std
    if name == "cifar":
        steps: list[Transform] = [RandomCropPad(size, 4), RandomHorizontalFlip(0.5)] if train else []
    else:
        steps = ([RandomResizedCrop(size), RandomHorizontalFlip(0.5)] if train
                 else [ResizeCenterCrop(round(size * 256 / 224), size)])
    return Compose([*steps, ToTensor(), Normalize(mean, std)])


class ImageClassificationDataset(Dataset):
    """Decoded, augmented images of `records` (module docstring).

    Args:
        records: where the encoded images and labels int64 [N] come from.
        transform: `(uint8 [H, W, 3], rng) -> float32 [3, H, W]`, e.g. transform_preset("cifar", True);
            None: ToTensor only (images of one size batch together).
        seed: the augmentation seed (independent of torch's and numpy's global RNGs).
    """

    def __init__(self, records: ImageRecords, transform: Transform | None = None, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.records, self.seed = records, seed
        self.transform = transform if transform is not None else ToTensor()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def labels(self) -> np.ndarray:
        """int64 [N], without decoding anything."""
        return self.records.labels

    @property
    def num_classes(self) -> int:
        return self.records.num_classes

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Augment the following samples as epoch `epoch`; seen by already-started workers."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] of record `index`: from the records' decoded cache (data/decoded_cache.py) when
        they have one, else decoded now."""
        decoded = getattr(self.records, "decoded", None)
        if decoded is not None:
            return decoded(index)
        return decode_rgb(self.records.read(index), self.records.describe(index))

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (self.epoch, int(index))
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        image = self.image(index)
        rng = np.random.default_rng([self.seed, epoch, index])  # SeedSequence: independent streams
        return self.transform(image, rng), int(self.records.labels[index])
