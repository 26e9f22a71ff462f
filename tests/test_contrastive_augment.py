"""MoCo v2's augmentation pieces against known answers: the hue shift against Python's colorsys (HSV),
the Gaussian blur against a directly evaluated 2-D Gaussian on an impulse and a constant image, and
which pieces each preset / version applies."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from mhe_scale.data.two_views import ColorJitter, GaussianBlur, contrastive_transform, shift_hue


@pytest.mark.parametrize("turns", [0.0, 0.1, -0.07, 1 / 3, 0.5])
def test_hue_shift_equals_colorsys(turns):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3)).astype(np.float32)
    image[0, 0] = (40, 40, 40)  # grey: no hue, unchanged
    ref = np.array([[colorsys.hsv_to_rgb((h + turns) % 1.0, s, v) for h, s, v in
                     (colorsys.rgb_to_hsv(*(p / 255.0)) for p in row)] for row in image]) * 255.0
    np.testing.assert_allclose(shift_hue(image, turns), ref, atol=1e-3)


def test_a_third_of_the_wheel_turns_red_into_green():
    np.testing.assert_allclose(shift_hue(np.array([[[255, 0, 0]]], np.float32), 1 / 3), [[[0, 255, 0]]], atol=1e-3)


def test_blur_of_an_impulse_is_the_gaussian_and_a_constant_stays():
    image = np.zeros((224, 224, 3), np.uint8)
    image[100, 120] = 255
    out = GaussianBlur((1.5, 1.5), p=1.0)(image, np.random.default_rng(0)).astype(np.float64)
    dy, dx = np.mgrid[-5:6, -5:6]
    g1 = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)  # the kernel's radius is ceil(3 sigma) = 5
    expected = 255 * np.exp(-0.5 * (dy ** 2 + dx ** 2) / 1.5 ** 2) / g1.sum() ** 2
    for c in range(3):
        np.testing.assert_allclose(out[95:106, 115:126, c], expected, atol=0.51)  # rounded to uint8
    assert out.sum() == 3 * out[95:106, 115:126, 0].sum()  # nothing beyond the kernel's reach
    flat = np.full((40, 50, 3), 77, np.uint8)
    assert (GaussianBlur(p=1.0)(flat, np.random.default_rng(1)) == 77).all()
    assert GaussianBlur(p=0.0)(image, np.random.default_rng(2)) is image


def test_presets_and_versions():
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert "GaussianBlur" in names(contrastive_transform("imagenet", 2))
    assert "GaussianBlur" not in names(contrastive_transform("cifar", 2))
    assert "GaussianBlur" not in names(contrastive_transform("imagenet", 1))
    jitter = {v: next(x for x in contrastive_transform("cifar", v).transforms if isinstance(x, ColorJitter)) for v in (1, 2)}
    assert (jitter[1].p, jitter[1].hue) == (1.0, 0.0) and (jitter[2].p, jitter[2].hue) == (0.8, 0.1)
    with pytest.raises(ValueError, match="hue=0.7"):
        ColorJitter(hue=0.7)
    image = np.random.default_rng(3).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    t = contrastive_transform("imagenet", 2, size=32)
    a, b = t(image, np.random.default_rng(5)), t(image, np.random.default_rng(5))
    assert a.shape == (3, 32, 32) and (a == b).all()  # seeded: the same view for the same generator
