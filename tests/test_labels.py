import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_scale.labels import LabelCodec, factorize, multi_hot, pad_label_lists, product_topk


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data())
def test_codec_round_trip_and_digits(sizes, data):
    capacity = math.prod(sizes)
    num_classes = data.draw(st.integers(1, capacity))
    codec = LabelCodec(sizes, num_classes)
    labels = torch.arange(num_classes)
    digits = codec.encode(labels)
    assert digits.shape == (num_classes, len(sizes))
    assert torch.equal(codec.decode(digits), labels)
    # head 0 most significant: digits in lexicographic order = label order
    as_tuples = [tuple(d) for d in digits.tolist()]
    assert as_tuples == sorted(as_tuples)
    for h, c in enumerate(sizes):
        assert int(digits[:, h].max()) < c
        stride = math.prod(sizes[h + 1:])
        assert torch.equal(digits[:, h], (labels // stride) % c)


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_valid_boxes_partition_exactly_the_valid_codes(sizes, data):
    num_classes = data.draw(st.integers(1, math.prod(sizes)))
    codec = LabelCodec(sizes, num_classes)
    seen = []
    for box in codec.valid_boxes():
        for digits in itertools.product(*[range(lo, hi) for lo, hi in box]):
            seen.append(int(codec.decode(torch.tensor(digits))))
    assert sorted(seen) == list(range(num_classes))  # each valid code exactly once


def test_is_valid_masks_padding_codes():
    codec = LabelCodec([4, 3], 10)
    codes = codec.decode(torch.tensor([[3, 0], [3, 1], [2, 2]]))
    assert codes.tolist() == [9, 10, 8]
    assert codec.is_valid(codes).tolist() == [True, False, True]


@pytest.mark.parametrize("sizes,num_classes", [([4, 3], 10), ([3, 3, 3], 23), ([5, 5, 5], 100), ([2, 7], 14),
                                               ([6, 1, 4], 19), ([1000, 3], 2001)])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_product_topk_equals_brute_force(sizes, num_classes, k):
    gen = torch.Generator().manual_seed(0)
    codec = LabelCodec(sizes, num_classes)
    scores = [torch.randn(6, c, generator=gen, dtype=torch.float64) for c in sizes]
    digits = codec.encode(torch.arange(num_classes))
    full = sum(scores[h][:, digits[:, h]] for h in range(len(sizes)))  # [B, C] every valid code
    ref_scores, ref_ids = full.topk(min(k, num_classes), dim=1)
    got_scores, got_ids = product_topk(scores, codec, k)
    assert torch.equal(got_ids, ref_ids)
    assert torch.allclose(got_scores, ref_scores.float(), atol=1e-6)
    assert bool(codec.is_valid(got_ids).all())


def test_product_topk_never_returns_padding_even_when_it_scores_best():
    codec = LabelCodec([3, 3], 7)  # codes 7, 8 are padding: digits (2,1), (2,2)
    h0 = torch.tensor([[0.0, 1.0, 100.0]])
    h1 = torch.tensor([[0.0, 50.0, 60.0]])
    scores, ids = product_topk([h0, h1], codec, 2)
    # padding (2,2)=160 and (2,1)=150 score best; valid: (2,0)=6 -> 100, then (1,2)=5 -> 61
    assert ids.tolist() == [[6, 5]]
    assert scores.tolist() == [[100.0, 61.0]]


@pytest.mark.parametrize("num_classes,num_heads", [(10, 2), (1000, 2), (670_091, 2), (2_059_906, 2),
                                                   (1_000_000, 3), (13, 3), (2, 2), (1, 1), (97, 4)])
def test_factorize(num_classes, num_heads):
    sizes = factorize(num_classes, num_heads)
    assert len(sizes) == num_heads
    assert math.prod(sizes) >= num_classes
    assert sizes == sorted(sizes, reverse=True)
    if num_classes >= 1000:
        assert math.prod(sizes) - num_classes <= 0.01 * num_classes  # little padding
        assert max(sizes) <= 2 * round(num_classes ** (1 / num_heads))  # balanced


def test_factorize_known_values():
    assert factorize(1_000_000, 2) == [1000, 1000]
    assert math.prod(factorize(2_059_906, 2)) - 2_059_906 < 10


def test_codec_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"prod=12 .*num_classes=13"):
        LabelCodec([4, 3], 13)
    with pytest.raises(ValueError, match="head size must be >= 1"):
        LabelCodec([4, 0], 1)
    codec = LabelCodec([4, 3], 10)
    with pytest.raises(ValueError, match=r"label 10 at position \(2,\) is outside \[0, 10\)"):
        codec.encode(torch.tensor([0, 9, 10]))
    with pytest.raises(ValueError, match=r"label -3"):
        codec.encode(torch.tensor([-3]))
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        factorize(10, 0)


def test_multi_hot_and_padding():
    targets = pad_label_lists([[3, 0], [], [2]])
    assert targets.tolist() == [[3, 0], [-1, -1], [2, -1]]
    hot = multi_hot(targets, 4)
    assert hot.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
