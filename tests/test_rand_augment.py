"""RandAugment PIL path: per-sample determinism and known answers of each operation."""

from __future__ import annotations

import numpy as np
import pytest

from mhe_scale.data.image_dataset import transform_preset
from mhe_scale.data.image_transforms import ToTensor
from mhe_scale.data.rand_augment import OPS, RandAugment, apply_op, with_rand_augment


def _image(h: int = 24, w: int = 32) -> np.ndarray:
    """Deterministic textured uint8 [h, w, 3] covering 0..255."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_fixed_seed_epoch_index_gives_the_same_augmentation() -> None:
    ra, img = RandAugment(3, 9), _image()
    a = ra(img, np.random.default_rng([0, 1, 5]))
    b = ra(img, np.random.default_rng([0, 1, 5]))
    assert np.array_equal(a, b)
    others = [ra(img, np.random.default_rng([0, e, i])) for e, i in ((2, 5), (1, 6), (3, 7))]
    assert any(not np.array_equal(a, o) for o in others)
    assert a.shape == img.shape and a.dtype == np.uint8


def test_zero_ops_and_identity_leave_the_image_unchanged() -> None:
    img = _image()
    assert np.array_equal(RandAugment(0, 10)(img, np.random.default_rng(0)), img)
    assert np.array_equal(apply_op("identity", img, 10), img)


@pytest.mark.parametrize("name", [n for n in OPS if n not in ("autocontrast", "equalize")])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_magnitude_zero_leaves_every_parametrised_op_unchanged(name: str, sign: float) -> None:
    img = _image()
    assert np.array_equal(apply_op(name, img, 0, sign), img), name


def test_solarize_inverts_pixels_at_or_above_the_threshold() -> None:
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = apply_op("solarize", img, 5)  # threshold 256 - 128 = 128
    expected = np.where(img >= 128, 255 - img, img)
    assert np.array_equal(out, expected)
    assert out[0, 0, 0] == 0 and out[8, 0, 0] == 127 and out[15, 15, 0] == 0


def test_posterize_at_full_magnitude_keeps_four_bits() -> None:
    img = _image()
    assert np.array_equal(apply_op("posterize", img, 10), img & 0xF0)


def test_brightness_scales_pixels_by_one_plus_minus_point_nine() -> None:
    img = np.full((8, 8, 3), 100, dtype=np.uint8)
    assert np.all(apply_op("brightness", img, 10, 1.0) == 190)
    assert np.all(apply_op("brightness", img, 10, -1.0) == 10)


def test_autocontrast_stretches_the_range_to_0_255() -> None:
    img = np.linspace(50, 150, 8 * 8 * 3).astype(np.uint8).reshape(8, 8, 3)
    out = apply_op("autocontrast", img, 0)
    assert out.min() == 0 and out.max() == 255


def test_equalize_spreads_a_narrow_histogram() -> None:
    img = np.repeat(np.arange(100, 116, dtype=np.uint8), 64 * 3).reshape(32, 32, 3)  # 16 equal-count levels
    out = apply_op("equalize", img, 0)
    order = np.argsort(img[..., 0].ravel(), kind="stable")
    assert np.all(np.diff(out[..., 0].ravel()[order].astype(int)) >= 0)  # the mapping keeps the order
    assert out.min() < 20 and out.max() > 220  # a narrow range spread over 0..255


def test_translate_x_shifts_columns_and_fills_grey() -> None:
    img = _image(24, 33)
    out = apply_op("translate_x", img, 10, 1.0)
    t = round(150 / 331 * 33)  # 15 pixels
    assert np.array_equal(out[:, : 33 - t], img[:, t:])
    assert np.all(out[:, 33 - t:] == 128)


def test_translate_y_shifts_rows() -> None:
    img = _image(33, 24)
    out = apply_op("translate_y", img, 10, -1.0)
    t = 15
    assert np.array_equal(out[t:], img[: 33 - t])
    assert np.all(out[:t] == 128)


def test_rotate_keeps_the_centre_and_fills_the_corners() -> None:
    img = np.full((31, 31, 3), 200, dtype=np.uint8)
    out = apply_op("rotate", img, 10, 1.0)  # 30 degrees
    assert np.all(out[15, 15] == 200) and np.all(out[0, 0] == 128)


def test_shear_x_moves_rows_in_proportion_to_y() -> None:
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, 18:23] = 255  # a vertical white band
    out = apply_op("shear_x", img, 10, 1.0)  # x_in = x_out + 0.3 y: row y moves left by 0.3 y
    assert out[0, 20, 0] == 255 and out[10, 22, 0] == 0
    assert out[10, 17, 0] == 255 and out[19, 14, 0] == 255 and out[19, 19, 0] == 0


def test_color_leaves_grey_unchanged_and_desaturates() -> None:
    grey = np.full((8, 8, 3), 77, dtype=np.uint8)
    assert np.array_equal(apply_op("color", grey, 10, -1.0), grey)
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 200
    out = apply_op("color", red, 10, -1.0).astype(int)  # factor 0.1: close to grey
    assert out[0, 0, 0] - out[0, 0, 1] < 40


def test_contrast_and_sharpness_leave_a_constant_image_unchanged() -> None:
    flat = np.full((8, 8, 3), 90, dtype=np.uint8)
    for name in ("contrast", "sharpness"):
        assert np.array_equal(apply_op(name, flat, 10, 1.0), flat), name
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, 4:] = 200
    out = apply_op("contrast", img, 10, -1.0).astype(int)  # factor 0.1: levels move toward the mean
    assert out[0, 7, 0] - out[0, 0, 0] < 40


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="0 <= M <= 10"):
        RandAugment(2, 11)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        apply_op("blur", _image(), 1)


def test_with_rand_augment_inserts_before_to_tensor() -> None:
    pipe = with_rand_augment(transform_preset("cifar", True), 2, 9)
    names = [type(t).__name__ for t in pipe.transforms]
    assert names.index("RandAugment") == names.index("ToTensor") - 1
    assert isinstance(pipe.transforms[names.index("ToTensor")], ToTensor)
    out = pipe(_image(32, 32), np.random.default_rng([0, 0, 0]))
    assert tuple(out.shape) == (3, 32, 32)
