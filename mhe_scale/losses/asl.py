"""Asymmetric loss (ASL; Ridnik et al., ICCV 2021) for multi-label classification."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhe_scale.losses.base import Metrics, check_multilabel, check_reduction, precision_at_1, reduce_kept, register_loss


def focusing(base: Tensor, gamma: float, eps: float) -> Tensor:
    """base ** gamma (1 when gamma = 0); the base is clamped at eps so that gamma < 1 keeps a finite
    gradient where base = 0 (the value it multiplies is then 0 anyway)."""
    return torch.ones_like(base) if gamma == 0 else base.clamp_min(eps).pow(gamma)


@register_loss("asl")
class AsymmetricLoss(nn.Module):
    """ASL per entry of logits x [B, C], targets y [B, C] (1 / 0; < 0 ignored), p = σ(x):

        L = −[ y (1 − p)^γ+ log p + (1 − y) p_m^γ− log(1 − p_m) ],   p_m = max(p − m, 0)

    (m = clip: negatives with p <= m cost nothing). Logs are taken of max(·, eps).
    reduction: 'sum' over kept entries (the paper's choice) or 'mean' over them (0 when none kept).
    metrics: 'precision_at_1', the fraction of rows whose top logit is a positive.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "sum") -> None:
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"asl: gamma_pos={gamma_pos} and gamma_neg={gamma_neg} must be >= 0")
        if not 0.0 <= clip < 1.0 or eps <= 0:
            raise ValueError(f"asl: clip={clip} must be in [0, 1) and eps={eps} > 0")
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = float(gamma_pos), float(gamma_neg), float(clip), eps
        self.reduction = check_reduction(reduction, "asl")

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        x, y, keep = check_multilabel(logits, targets, "asl")
        p = torch.sigmoid(x)
        p_m = (p - self.clip).clamp_min(0) if self.clip > 0 else p
        positive = y * focusing(1 - p, self.gamma_pos, self.eps) * torch.log(p.clamp_min(self.eps))
        negative = (1 - y) * focusing(p_m, self.gamma_neg, self.eps) * torch.log((1 - p_m).clamp_min(self.eps))
        loss = reduce_kept(-(positive + negative), keep, self.reduction)
        return loss, {"precision_at_1": precision_at_1(x, targets)}

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, eps={self.eps}, "
                f"reduction={self.reduction!r}")
