"""Multi-label heads on pooled backbone features [B, D] -> scores [B, C].

Every multi-label head (these, ML-Decoder, ML-GCN) declares what it reads from the backbone in
`input_kind` ("pooled" [B, D], "tokens" [B, N, D], "map" [B, D, h, w]) and whether its scores are
cosines (`cosine`: trained with AAM, turned into logits by the loss's scale s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PooledLinearHead(nn.Module):
    """features [B, D] -> logits [B, C] = features W^T + b (BCE / ASL)."""

    input_kind = "pooled"
    cosine = False

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


class PooledCosineHead(nn.Module):
    """features [B, D] -> cosines [B, C] = <f/|f|, w_c/|w_c|> (AAM; no bias)."""

    input_kind = "pooled"
    cosine = True

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default range
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-bound, bound))

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).t()

