"""Exact top-k over the product of per-head scores, without scoring all prod(c_h) codes.

score(code) = sum_h head_scores[h][digit_h(code)].  Inside a box of digit ranges that is a
full product, every global top-k code has each digit (indeed each prefix of digits) among the
top-k of its partial sums: otherwise k strictly better codes exist in the same box. The valid
codes [0, C) split into at most H such boxes (`LabelCodec.valid_boxes`), so the search runs per
box, merging heads one at a time and keeping k partial candidates, then merges the boxes.
Cost per sample: O(H * sum_h c_h + H^2 * k^2), never O(C).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mhe_scale.labels.codec import LabelCodec


def product_topk(head_scores: Sequence[Tensor], codec: LabelCodec, k: int) -> tuple[Tensor, Tensor]:
    """Top-k valid codes of sum_h head_scores[h][d_h].

    Args:
        head_scores: H tensors [B, c_h] (e.g. per-head log-probabilities).
        codec: the codec whose sizes match the heads; codes >= C are never returned.
        k: how many to return; clipped to C.
    Returns:
        scores [B, k'] (descending) and codes [B, k'] (global label ids), k' = min(k, C).
    """
    if len(head_scores) != codec.num_heads:
        raise ValueError(f"got {len(head_scores)} head score tensors for a codec of {codec.num_heads} heads")
    for h, (s, c) in enumerate(zip(head_scores, codec.sizes)):
        if s.shape[-1] != c:
            raise ValueError(f"head {h} scores have {s.shape[-1]} columns, codec expects {c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, codec.num_classes)
    all_scores, all_codes = [], []
    for box in codec.valid_boxes():
        scores, codes = _box_topk(head_scores, codec, box, k)
        all_scores.append(scores)
        all_codes.append(codes)
    scores = torch.cat(all_scores, dim=1)
    codes = torch.cat(all_codes, dim=1)
    top, pos = scores.topk(k, dim=1)
    return top, codes.gather(1, pos)


def _box_topk(head_scores: Sequence[Tensor], codec: LabelCodec, box: list[tuple[int, int]], k: int) -> tuple[Tensor, Tensor]:
    scores: Tensor | None = None
    codes: Tensor | None = None
    for h, (lo, hi) in enumerate(box):
        kh = min(k, hi - lo)
        vals, idx = head_scores[h][:, lo:hi].float().topk(kh, dim=1)
        part = (idx + lo) * codec.strides[h]
        if scores is None:
            scores, codes = vals, part
            continue
        assert codes is not None
        scores = (scores.unsqueeze(2) + vals.unsqueeze(1)).flatten(1)
        codes = (codes.unsqueeze(2) + part.unsqueeze(1)).flatten(1)
        if scores.shape[1] > k:
            scores, pos = scores.topk(k, dim=1)
            codes = codes.gather(1, pos)
    assert scores is not None and codes is not None
    return scores, codes
