"""Target layouts shared by every head.

single-label: LongTensor [B] of global ids.
multi-label:  LongTensor [B, L] of global ids, each row padded at the end with PAD (-1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mhe_scale.labels.codec import PAD


def pad_label_lists(label_lists: Sequence[Sequence[int]], min_width: int = 1) -> Tensor:
    """[[3, 7], [1]] -> tensor([[3, 7], [1, -1]]) (rows padded with PAD)."""
    width = max([min_width] + [len(row) for row in label_lists])
    out = torch.full((len(label_lists), width), PAD, dtype=torch.long)
    for i, row in enumerate(label_lists):  # data-side helper, not a training hot path
        if len(row):
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def label_pairs(targets: Tensor) -> tuple[Tensor, Tensor]:
    """Padded targets [B, L] -> (row index [N], label id [N]) of the non-pad entries."""
    rows, cols = (targets != PAD).nonzero(as_tuple=True)
    return rows, targets[rows, cols]


def multi_hot(targets: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Padded targets [B, L] (or [B]) -> multi-hot matrix [B, num_classes]."""
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)
    out = torch.zeros(targets.shape[0], num_classes, dtype=dtype, device=targets.device)
    rows, labels = label_pairs(targets)
    out[rows, labels] = 1
    return out
