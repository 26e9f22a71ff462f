"""RandAugment (Cubuk et al. 2020) on PIL: N operations drawn uniformly with replacement from 14, each
applied at one global magnitude M (0 <= M <= 10, the paper's scale; ImageNet ResNet-50: N=2, M=9).

A Transform of data/image_transforms.py: `(uint8 [H, W, 3], rng) -> uint8 [H, W, 3]`, with the
per-sample rng the dataset seeds from (seed, epoch, index), so a sample's augmentation depends on that
triple only. Insert it after the crop / flip and before ToTensor (`with_rand_augment`).

Magnitude -> parameter (the ranges of AutoAugment, Cubuk et al. 2019, reached at M = 10; a random sign
for the symmetric ones; here a larger M distorts more for every operation, M = 0 leaves every image
unchanged except autocontrast and equalize, which take no magnitude):
    rotate      ±30 M/10 degrees               shear_x/y    ±0.3 M/10 (shear factor)
    translate_x/y ±(150/331) M/10 of the side  solarize     invert pixels >= 256 - 256 M/10
    posterize   keep 8 - round(4 M/10) bits     color, contrast, brightness, sharpness: factor 1 ± 0.9 M/10
Geometric operations fill the uncovered area with grey (128).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mhe_scale.data.image_transforms import Compose, ToTensor

MAX_MAGNITUDE = 10.0
FILL = (128, 128, 128)
TRANSLATE_FRACTION = 150 / 331  # AutoAugment: 150 pixels on 331-pixel images

OpFn = Callable[[Image.Image, float], Image.Image]


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) takes input (a x + b y + c, d x + e y + f), matrix = (a, b, c, d, e, f)."""
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


def _enhance(kind: type) -> OpFn:
    return lambda img, v: kind(img).enhance(1.0 + v)


# each op: (PIL image, signed level v = ±M/10 in [-1, 1]) -> PIL image
OPS: dict[str, OpFn] = {
    "identity": lambda img, v: img,
    "autocontrast": lambda img, v: ImageOps.autocontrast(img),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "rotate": lambda img, v: img.rotate(30.0 * v, resample=Image.BILINEAR, fillcolor=FILL),
    "solarize": lambda img, v: ImageOps.solarize(img, 256 - round(256 * abs(v))),
    "color": _enhance(ImageEnhance.Color),
    "posterize": lambda img, v: ImageOps.posterize(img, 8 - round(4 * abs(v))),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda img, v: _affine(img, (1, 0.3 * v, 0, 0, 1, 0)),
    "shear_y": lambda img, v: _affine(img, (1, 0, 0, 0.3 * v, 1, 0)),
    "translate_x": lambda img, v: _affine(img, (1, 0, round(TRANSLATE_FRACTION * v * img.size[0]), 0, 1, 0)),
    "translate_y": lambda img, v: _affine(img, (1, 0, 0, 0, 1, round(TRANSLATE_FRACTION * v * img.size[1]))),
}
# brightness / color / contrast / sharpness use the full signed range: factor 1 ± 0.9 M/10
_ENHANCE_SCALE = 0.9
_ENHANCE = ("color", "contrast", "brightness", "sharpness")


def apply_op(name: str, image: np.ndarray, magnitude: float, sign: float = 1.0) -> np.ndarray:
    """One operation at `magnitude` (0..10) with direction `sign` (±1): uint8 [H, W, 3] -> same shape."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose one of {sorted(OPS)}")
    v = sign * magnitude / MAX_MAGNITUDE * (_ENHANCE_SCALE if name in _ENHANCE else 1.0)
    return np.asarray(OPS[name](Image.fromarray(np.ascontiguousarray(image)), v))


class RandAugment:
    """N random operations of magnitude M per sample (module docstring). uint8 [H, W, 3] -> same shape."""

    def __init__(self, num_ops: int, magnitude: float, ops: tuple[str, ...] = tuple(OPS)) -> None:
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment needs N >= 0 and 0 <= M <= {MAX_MAGNITUDE:g}, got N={num_ops}, "
                             f"M={magnitude}")
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ValueError(f"RandAugment ops {unknown or '()'} are not known; choose from {sorted(OPS)}")
        self.num_ops, self.magnitude, self.ops = int(num_ops), float(magnitude), tuple(ops)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for _ in range(self.num_ops):
            name = self.ops[int(rng.integers(len(self.ops)))]
            sign = 1.0 if rng.random() < 0.5 else -1.0
            image = apply_op(name, image, self.magnitude, sign)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(N={self.num_ops}, M={self.magnitude:g})"


def with_rand_augment(pipeline: Compose, num_ops: int, magnitude: float) -> Compose:
    """A copy of `pipeline` with RandAugment(num_ops, magnitude) inserted just before its ToTensor."""
    steps = list(pipeline.transforms)
    at = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    if at is None:
        raise ValueError("with_rand_augment: the pipeline has no ToTensor step to insert RandAugment before")
    return Compose([*steps[:at], RandAugment(num_ops, magnitude), *steps[at:]])
