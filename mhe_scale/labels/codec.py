"""Mixed-radix label codec: a global label id <-> one digit per head.

Head 0 is the most significant digit: for head sizes c_0..c_{H-1},
    d_h(y) = (y // stride_h) % c_h,   stride_h = prod(c_{h+1..H-1}),
so y = sum_h d_h * stride_h.  Codes in [C, prod(c_h)) are padding: they decode to ids that
do not exist and must be masked when predicting (see `LabelCodec.is_valid`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

PAD = -1
"""Padding value in multi-label target tensors [B, L] (labels per row, padded with -1)."""


class LabelCodec:
    """Encode global label ids into per-head digits and back.

    Args:
        sizes: head sizes c_0..c_{H-1}; their product must be >= num_classes.
        num_classes: C, the number of real labels. Defaults to prod(sizes).
    """

    def __init__(self, sizes: Sequence[int], num_classes: int | None = None) -> None:
        sizes = tuple(int(c) for c in sizes)
        if len(sizes) == 0:
            raise ValueError("LabelCodec needs at least one head size, got sizes=()")
        if any(c < 1 for c in sizes):
            raise ValueError(f"every head size must be >= 1, got sizes={list(sizes)}")
        capacity = math.prod(sizes)
        num_classes = capacity if num_classes is None else int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if capacity < num_classes:
            raise ValueError(
                f"head sizes {list(sizes)} encode only prod={capacity} labels but num_classes="
                f"{num_classes}; enlarge a head or use factorize({num_classes}, {len(sizes)})"
            )
        self.sizes = sizes
        self.num_classes = num_classes
        self.capacity = capacity
        strides = [1] * len(sizes)
        for h in range(len(sizes) - 2, -1, -1):
            strides[h] = strides[h + 1] * sizes[h + 1]
        self.strides = tuple(strides)

    @property
    def num_heads(self) -> int:
        return len(self.sizes)

    def __repr__(self) -> str:
        return f"LabelCodec(sizes={list(self.sizes)}, num_classes={self.num_classes})"

    def _stride_tensor(self, like: Tensor) -> Tensor:
        return torch.tensor(self.strides, dtype=torch.long, device=like.device)

    def check_labels(self, labels: Tensor, allow_pad: bool = False) -> None:
        """Raise ValueError naming the first label outside [0, C) (PAD allowed if asked)."""
        check_label_range(labels, self.num_classes, allow_pad=allow_pad)

    def encode(self, labels: Tensor, check: bool = True) -> Tensor:
        """labels [...] int ids in [0, C) -> digits [..., H]."""
        labels = labels.long()
        if check:
            self.check_labels(labels)
        strides = self._stride_tensor(labels)
        sizes = torch.tensor(self.sizes, dtype=torch.long, device=labels.device)
        return torch.div(labels.unsqueeze(-1), strides, rounding_mode="floor") % sizes

    def decode(self, digits: Tensor) -> Tensor:
        """digits [..., H] -> codes [...] in [0, prod(sizes)); codes >= C are padding."""
        if digits.shape[-1] != self.num_heads:
            raise ValueError(f"digits must end in a dimension of {self.num_heads} heads, got {tuple(digits.shape)}")
        return (digits.long() * self._stride_tensor(digits)).sum(-1)

    def is_valid(self, codes: Tensor) -> Tensor:
        """Bool mask of codes that name a real label (code < C)."""
        return (codes >= 0) & (codes < self.num_classes)

    def valid_boxes(self) -> list[list[tuple[int, int]]]:
        """Split [0, C) into at most H disjoint boxes of per-head digit ranges.

        Each box is a list of (lo, hi) digit ranges, one per head; every code whose digits lie
        in a box is valid, and every valid code lies in exactly one box. Used for exact top-k
        decoding (a box is a full product, where per-head top-k is exact).
        """
        if self.num_classes == self.capacity:
            return [[(0, c) for c in self.sizes]]
        # valid codes are those <= t = C-1 in lexicographic digit order: for each head j, the
        # codes that match t on heads 0..j-1 and are smaller on head j (rest free), plus t itself,
        # which joins the last such box.
        t = [int(d) for d in self.encode(torch.tensor(self.num_classes - 1), check=False).tolist()]
        boxes = []
        for j in range(self.num_heads):
            upper = t[j] + 1 if j == self.num_heads - 1 else t[j]
            if upper > 0:
                box = [(t[i], t[i] + 1) for i in range(j)] + [(0, upper)]
                boxes.append(box + [(0, c) for c in self.sizes[j + 1:]])
        return boxes


def check_label_range(labels: Tensor, num_classes: int, allow_pad: bool = False) -> None:
    """Raise ValueError naming the first label outside [0, num_classes) (PAD=-1 if allowed).

    On an accelerator the check is asynchronous (torch._assert_async: no host sync per step; a bad
    label stops the run at the next synchronisation with a message naming the range, not the position).
    """
    if labels.numel() == 0:
        return
    bad = (labels >= num_classes) | (labels < 0)
    if allow_pad:
        bad &= labels != PAD
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"a label is outside [0, {num_classes}); check the dataset's label ids "
                                        f"against num_classes={num_classes} (run on CPU to see its position)")
        return
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(labels[pos])
        hint = " (-1 pads multi-label rows)" if allow_pad else ""
        raise ValueError(
            f"label {value} at position {pos} is outside [0, {num_classes}){hint}; "
            f"check the dataset's label ids against num_classes={num_classes}"
        )


def factorize(num_classes: int, num_heads: int, window: float = 0.35) -> list[int]:
    """Pick head sizes, largest first, with prod >= num_classes and as little padding as found.

    Sizes stay near num_classes ** (1 / num_heads) (within +-`window` relative) so no head is
    much larger than the others; among those, the smallest product wins, then the smallest sum.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if num_heads == 1:
        return [num_classes]
    best = _search(num_classes, num_heads, window)
    return sorted(best, reverse=True)


def _search(c: int, h: int, window: float) -> list[int]:
    if h == 1:
        return [c]
    root = c ** (1.0 / h)
    lo = max(2, int(math.floor(root * (1 - window))))
    hi = max(lo, int(math.ceil(root * (1 + window))))
    # keep the search cheap for many heads: at most ~64 candidates per level
    step = max(1, (hi - lo) // 64) if h > 2 else 1
    best: list[int] | None = None
    best_key: tuple[int, int] | None = None
    for first in range(lo, hi + 1, step):
        rest = _search(-(-c // first), h - 1, window)
        sizes = [first] + rest
        key = (math.prod(sizes), sum(sizes))
        if best_key is None or key < best_key:
            best, best_key = sizes, key
    assert best is not None
    return best
