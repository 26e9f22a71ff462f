"""Classification augmentations on PIL / numpy / torch only (torchvision is not imported here: its
CUDA wheel does not import beside the CPU torch, see docs/environment.md).

Every transform is a callable `(image, rng) -> image` where rng is a `numpy.random.Generator` the
caller seeds per sample (ImageClassificationDataset: from (seed, epoch, index)), so the result of a
sample depends on that triple only, never on DataLoader workers or call order. Images travel as
numpy uint8 [H, W, 3] RGB until `ToTensor` turns them into float32 [3, H, W] in [0, 1];
`Normalize` then maps each channel c to (x - mean_c) / std_c. Resizing uses PIL bilinear (with
PIL's antialiasing when shrinking).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Transform = Callable[[object, np.random.Generator], object]


class UndecodableImageError(ValueError):
    """Image bytes that PIL cannot decode; the message names where they came from."""


def decode_rgb(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB (PIL; grey, CMYK, palette converted to RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, ... on corrupt bytes
        raise UndecodableImageError(f"{where}: {len(data)} image bytes do not decode ({err}); re-encode or "
                                    "remove this image") from None


class Compose:
    """Apply transforms in order, each with the same per-sample rng."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: object, rng: np.random.Generator) -> object:
        for t in self.transforms:
            image = t(image, rng)
        return image


class RandomCropPad:
    """Zero-pad `padding` pixels on every side, then crop a uniformly placed size x size window
    (CIFAR: size 32, padding 4). uint8 [H, W, 3] -> uint8 [size, size, 3]."""

    def __init__(self, size: int, padding: int = 0) -> None:
        if size < 1 or padding < 0:
            raise ValueError(f"need size >= 1 and padding >= 0, got size={size}, padding={padding}")
        self.size, self.padding = size, padding

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p, s = self.padding, self.size
        h, w = image.shape[0] + 2 * p, image.shape[1] + 2 * p
        if h < s or w < s:
            raise ValueError(f"image {image.shape[0]}x{image.shape[1]} padded by {p} is smaller than the crop {s}")
        padded = image
        if p:  # np.zeros + copy: ~15x faster than np.pad on CIFAR-sized images
            padded = np.zeros((h, w, image.shape[2]), dtype=image.dtype)
            padded[p:p + image.shape[0], p:p + image.shape[1]] = image
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        return padded[top:top + s, left:left + s]


class RandomHorizontalFlip:
    """Mirror left-right with probability p. uint8 [H, W, 3] -> same shape."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if rng.random() < self.p else image


def _resize(image: np.ndarray, width: int, height: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """PIL bilinear resize of `image` (or of its region box = (left, top, right, bottom))."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR, box=box))


class RandomResizedCrop:
    """Crop a random region of area fraction in `scale` and aspect ratio w/h in `ratio` (log-uniform),
    resize it to size x size (Szegedy et al. 2015's Inception augmentation). After 10 failed
    attempts: the largest centred crop whose ratio is clamped into `ratio`.
    uint8 [H, W, 3] -> uint8 [size, size, 3]."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> None:
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {scale}, {ratio}")
        self.size, self.scale, self.ratio, self.attempts = size, scale, ratio, attempts

    def get_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """-> (top, left, crop height, crop width) inside a height x width image."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.attempts):
            target = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = self.get_box(image.shape[0], image.shape[1], rng)
        return _resize(image, self.size, self.size, box=(left, top, left + w, top + h))


class ResizeCenterCrop:
    """Resize so the shorter side is `resize` (aspect kept), then crop the centred crop x crop
    (ImageNet eval: 256, 224). uint8 [H, W, 3] -> uint8 [crop, crop, 3]."""

    def __init__(self, resize: int, crop: int) -> None:
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than the resized shorter side {resize}")
        self.resize, self.crop = resize, crop

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        if h <= w:
            nh, nw = self.resize, int(self.resize * w / h)
        else:
            nh, nw = int(self.resize * h / w), self.resize
        if (nh, nw) != (h, w):
            image = _resize(image, nw, nh)
        top, left = int(round((nh - self.crop) / 2)), int(round((nw - self.crop) / 2))
        return image[top:top + self.crop, left:left + self.crop]


class ToTensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class Normalize:
    """float32 [3, H, W] -> (x - mean[c]) / std[c] per channel c."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Tensor, rng: np.random.Generator) -> Tensor:
        return (image - self.mean) / self.std
