"""Multi-label binary cross-entropy on logits, with ignored entries."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.losses.base import Metrics, check_multilabel, check_reduction, precision_at_1, reduce_kept, register_loss


@register_loss("bce")
class BinaryCrossEntropy(nn.Module):
    """−[y log σ(x) + (1 − y) log(1 − σ(x))] per entry of logits x [B, C], targets y [B, C]
    (1 positive, 0 negative, < 0 ignored: no value, no gradient).

    reduction: 'mean' over kept entries (0 when none is kept) or 'sum' over them.
    metrics: 'precision_at_1', the fraction of rows whose top logit is a positive.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "bce")

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        x, y, keep = check_multilabel(logits, targets, "bce")
        per_entry = F.binary_cross_entropy_with_logits(x, y, reduction="none")  # [B, C]
        return reduce_kept(per_entry, keep, self.reduction), {"precision_at_1": precision_at_1(x, targets)}

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
