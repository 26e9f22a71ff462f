"""Recipe options of the multilabel task (issue 13): RandAugment switch, early stopping on validation
mAP, and the refusal of SAM."""

from __future__ import annotations

import numpy as np
import pytest

from mhe_scale.data.rand_augment import RandAugment
from mhe_scale.tasks.multilabel import MultilabelDataConfig, train_transform


def test_data_rand_augment_inserts_randaugment_before_to_tensor() -> None:
    assert not any(isinstance(t, RandAugment) for t in train_transform(MultilabelDataConfig()).transforms)
    tf = train_transform(MultilabelDataConfig(preset="cifar", rand_augment=[2, 9]))
    (ra,) = [t for t in tf.transforms if isinstance(t, RandAugment)]
    assert (ra.num_ops, ra.magnitude) == (2, 9.0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = tf(img, np.random.default_rng([0, 1, 2])), tf(img, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 32, 32) and bool((a == b).all())


@pytest.mark.parametrize("value,match", [([2], r"give \[N, M\]"), ([1.5, 3], r"give \[N, M\]"),
                                         ([2, 12], "data.rand_augment: RandAugment needs")])
def test_bad_data_rand_augment_is_refused(value, match) -> None:
    with pytest.raises(ValueError, match=match):
        train_transform(MultilabelDataConfig(rand_augment=value))
