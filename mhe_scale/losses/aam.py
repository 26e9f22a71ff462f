"""Asymmetric angular margin loss (AAM; Prokofiev & Sovrasov 2022) on per-class cosines."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.losses.asl import focusing
from mhe_scale.losses.base import Metrics, check_multilabel, check_reduction, precision_at_1, reduce_kept, register_loss


@register_loss("aam")
class AsymmetricAngularMargin(nn.Module):
    """AAM per entry of cosines c [B, C] (feature · class centre, both L2-normalised), targets
    y [B, C] (1 / 0; < 0 ignored):

        p+ = σ(s (c − m)),  p− = σ(−s (c + m))
        L = −[ (k/s) y w+ log p+ + ((1 − k)/s) (1 − y) w− log p− ]

    with ASL-style focusing w+ = (1 − p+)^γ+, w− = (1 − p−)^γ− (1 when γ = 0). Published configs:
    s 17–23, m 0, k 0.7. reduction: 'sum' or 'mean' over kept entries (0 when none kept).
    metrics: 'precision_at_1', the fraction of rows whose top cosine is a positive.
    """

    def __init__(self, s: float = 23.0, m: float = 0.0, k: float = 0.7, gamma_pos: float = 0.0,
                 gamma_neg: float = 0.0, reduction: str = "sum") -> None:
        super().__init__()
        if s <= 0 or not 0.0 <= k <= 1.0:
            raise ValueError(f"aam: s={s} must be > 0 and k={k} in [0, 1]")
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"aam: gamma_pos={gamma_pos} and gamma_neg={gamma_neg} must be >= 0")
        self.s, self.m, self.k = float(s), float(m), float(k)
        self.gamma_pos, self.gamma_neg = float(gamma_pos), float(gamma_neg)
        self.reduction = check_reduction(reduction, "aam")

    def forward(self, cosines: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        c, y, keep = check_multilabel(cosines, targets, "aam")
        z_pos, z_neg = self.s * (c - self.m), -self.s * (c + self.m)
        log_p_pos, log_p_neg = F.logsigmoid(z_pos), F.logsigmoid(z_neg)  # exact logs, no eps needed
        w_pos = focusing(1 - log_p_pos.exp(), self.gamma_pos, 1e-12)
        w_neg = focusing(1 - log_p_neg.exp(), self.gamma_neg, 1e-12)
        positive = (self.k / self.s) * y * w_pos * log_p_pos
        negative = ((1 - self.k) / self.s) * (1 - y) * w_neg * log_p_neg
        loss = reduce_kept(-(positive + negative), keep, self.reduction)
        return loss, {"precision_at_1": precision_at_1(c, targets)}

    def extra_repr(self) -> str:
        return (f"s={self.s}, m={self.m}, k={self.k}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, "
                f"reduction={self.reduction!r}")
