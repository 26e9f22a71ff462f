"""Two augmented views per image for contrastive pre-training (MoCo v1/v2, KCL).

`TwoViewDataset(records, transform, seed)[i]` -> (views float32 [2, 3, H, W], label int): view v of
sample i in epoch e uses `numpy.random.default_rng([seed, e, i, v])`, so like
ImageClassificationDataset every view depends only on (seed, epoch, index, view).
`contrastive_transform(preset, version)`: MoCo's augmentation from the project's transforms plus
colour jitter, grayscale and blur: random resized crop (scale 0.2..1), colour jitter (brightness,
contrast, saturation 0.4 and, v2, hue 0.1; v1 always, v2 with p = 0.8), grayscale p = 0.2, v2 on the
imagenet preset: Gaussian blur with p = 0.5, sigma uniform in [0.1, 2.0] (kernel about 10 % of the
image side, MoCo v2 / SimCLR), horizontal flip. The cifar preset has no blur (at 32 pixels it only
erases the image; MoCo's and SimCLR's CIFAR set-ups leave it out).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from mhe_scale.data.image_dataset import PRESET_DEFAULTS, ImageClassificationDataset
from mhe_scale.data.image_transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor

GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ColorJitter:
    """uint8 [H, W, 3]: brightness, contrast, saturation factors uniform in [1 - s, 1 + s] and (hue > 0)
    a hue shift uniform in [-hue, hue] turns of the colour wheel, applied in a random order, with
    probability p."""

    def __init__(self, strength: float = 0.4, p: float = 1.0, hue: float = 0.0) -> None:
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter: hue={hue} must be in [0, 0.5] (a fraction of the colour wheel)")
        self.strength, self.p, self.hue = strength, p, hue

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        x = image.astype(np.float32)
        for op in rng.permutation(4 if self.hue > 0 else 3):
            if op == 3:
                x = shift_hue(x, rng.uniform(-self.hue, self.hue))
                continue
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


def shift_hue(x: np.ndarray, turns: float) -> np.ndarray:
    """float32 RGB [H, W, 3] in [0, 255] -> the same colours with the HSV hue rotated by `turns` (a
    fraction of the wheel); saturation and value unchanged."""
    value = x.max(axis=2)
    chroma = value - x.min(axis=2)
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.where(value == r, ((g - b) / safe) % 6.0, np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(chroma > 0, (hue / 6.0 + turns) % 1.0, 0.0) * 6.0  # sector position in [0, 6)
    # the standard HSV -> RGB: channel n takes v - c * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6
    out = [value - chroma * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0) for k in ((5.0 + hue) % 6.0, (3.0 + hue) % 6.0,
                                                                              (1.0 + hue) % 6.0)]
    return np.stack(out, axis=2).astype(np.float32)


class GaussianBlur:
    """uint8 [H, W, 3]: with probability p, a separable Gaussian blur with sigma uniform in `sigma` pixels
    x (side / 224) (MoCo v2's [0.1, 2.0] at 224 pixels), kernel radius ceil(3 sigma), reflected edges."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5, reference_side: int = 224) -> None:
        self.sigma, self.p, self.reference_side = sigma, p, reference_side

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return image
        sigma = rng.uniform(*self.sigma) * min(image.shape[:2]) / self.reference_side
        radius = max(1, int(np.ceil(3.0 * sigma)))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps = (taps / taps.sum()).astype(np.float32)
        x = image.astype(np.float32)
        for axis in (0, 1):
            pad = [(0, 0)] * 3
            pad[axis] = (radius, radius)
            padded = np.pad(x, pad, mode="reflect")
            size = x.shape[axis]
            x = sum(w * np.take(padded, np.arange(i, i + size), axis=axis) for i, w in enumerate(taps))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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
    default_size, mean, std = PRESET_DEFAULTS[preset]
    size = size or default_size
    jitter = ColorJitter(0.4, 1.0) if version == 1 else ColorJitter(0.4, 0.8, hue=0.1)
    blur = [GaussianBlur((0.1, 2.0), 0.5)] if version == 2 and preset == "imagenet" else []
    return Compose([RandomResizedCrop(size, scale=(0.2, 1.0)), jitter, RandomGrayscale(0.2), *blur,
                    RandomHorizontalFlip(0.5), ToTensor(), Normalize(mean, std)])


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
