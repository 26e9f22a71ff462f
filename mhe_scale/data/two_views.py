"""Two augmented views per image for contrastive pre-training (MoCo v1/v2, KCL).

`TwoViewDataset(records, transform, seed)[i]` -> (views float32 [2, 3, H, W], label int): view v of
sample i in epoch e uses `numpy.random.default_rng([seed, e, i, v])`, so like
ImageClassificationDataset every view depends only on (seed, epoch, index, view).
`contrastive_transform(preset, version)`: MoCo's augmentation from the project's transforms plus
colour jitter and grayscale: random resized crop (scale 0.2..1), colour jitter (brightness, contrast,
saturation 0.4; v1 always, v2 with p = 0.8), grayscale p = 0.2, horizontal flip. (MoCo v2's Gaussian
blur is left out: it is not used at CIFAR's 32 pixels; ImageNet runs lose a little by its absence.)
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mhe_scale.data.image_dataset import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, ImageClassificationDataset
from mhe_scale.data.image_transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ColorJitter:
    """uint8 [H, W, 3]: brightness, contrast, saturation factors uniform in [1 - s, 1 + s], applied in a
    random order, with probability p."""

    def __init__(self, strength: float = 0.4, p: float = 1.0) -> None:
        self.strength, self.p = strength, p

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        x = image.astype(np.float32)
        for op in rng.permutation(3):
            f = rng.uniform(1 - self.strength, 1 + self.strength)
            if op == 0:
                x = x * f
            elif op == 1:
                x = (x - (x @ GRAY).mean()) * f + (x @ GRAY).mean()
            else:
                gray = (x @ GRAY)[..., None]
                x = (x - gray) * f + gray
            x = np.clip(x, 0, 255)
        return x.astype(np.uint8)


class RandomGrayscale:
    def __init__(self, p: float = 0.2) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        gray = (image.astype(np.float32) @ GRAY).round().clip(0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)


def contrastive_transform(preset: str = "cifar", version: int = 2, size: int | None = None) -> Compose:
    """MoCo v1 / v2 augmentation (module docstring), uint8 [H, W, 3] -> float32 [3, S, S] normalised."""
    if preset not in ("cifar", "imagenet") or version not in (1, 2):
        raise ValueError(f"contrastive_transform: preset={preset!r} (cifar | imagenet), version={version} (1 | 2)")
    size = size or (32 if preset == "cifar" else 224)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if preset == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    return Compose([RandomResizedCrop(size, scale=(0.2, 1.0)), ColorJitter(0.4, 1.0 if version == 1 else 0.8),
                    RandomGrayscale(0.2), RandomHorizontalFlip(0.5), ToTensor(), Normalize(mean, std)])


class TwoViewDataset(ImageClassificationDataset):
    """(views [2, 3, H, W], label) per image (module docstring); set_epoch as ImageClassificationDataset."""

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, int]:
        import torch

        epoch, index = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (self.epoch, int(index))
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} images")
        image = self.image(index)
        views = [self.transform(image, np.random.default_rng([self.seed, epoch, index, v])) for v in (0, 1)]
        return torch.stack(views), int(self.records.labels[index])
