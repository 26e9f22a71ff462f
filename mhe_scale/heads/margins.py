"""Additive angular / cosine margins: (cos [B, N], targets) -> logits [B, N].

Combined margin (m1, m2, m3) on the target column, theta = arccos(cos):
    target logit = s * (cos(m1 * theta + m2) - m3),   other logits = s * cos.
ArcFace is (1, m, 0), CosFace (1, 0, m); insightface's combined margins (1, 0.3, 0.2) and
(0.9, 0.4, 0.15) are accepted too. Where m1 * theta + m2 > pi the cosine stops decreasing in
theta; there the target logit uses s * (cos - m3 - m2 * sin(m2)) instead (the usual ArcFace fix).
That fix keeps the target logit non-increasing over theta in [0, pi] only for some (m1, m2):
m1 > 0, m2 >= 0 and, where m1 * theta + m2 reaches pi inside [0, pi] (at theta0), a downward step
there: cos(theta0) - m2 * sin(m2) <= -1. Other margins (e.g. SphereFace-like m1 > 1 with m2 = 0,
whose logit jumps back up at theta0, or m2 < 0) are refused when the margin is built: a logit that
rises with the angle would reward pushing a sample away from its class.

`targets` is either LongTensor [B] of target columns (-1: the row's target is not among these
columns, e.g. it lives on another shard or was not sampled) or BoolTensor [B, N] (multi-label).
Margins never modify their input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def check_monotone(m1: float, m2: float) -> None:
    """Raise ValueError unless the target logit cos(m1*theta + m2) (with the fallback past pi) is
    non-increasing in theta over [0, pi]; m3 only shifts it."""
    if not m1 > 0:
        raise ValueError(f"margin (m1, m2, m3): m1={m1} must be > 0 (1.0 for ArcFace / CosFace)")
    if m2 < 0:
        raise ValueError(f"margin (m1, m2, m3): m2={m2} must be >= 0: cos(m1*theta + m2) rises with theta while "
                         "m1*theta + m2 < 0")
    theta0 = (math.pi - m2) / m1
    if 0 <= theta0 < math.pi and math.cos(theta0) - m2 * math.sin(m2) > -1 + 1e-12:
        raise ValueError(f"margin (m1, m2, m3)=({m1}, {m2}, m3): the target logit is not monotone in the angle (it "
                         f"jumps up by {math.cos(theta0) - m2 * math.sin(m2) + 1:.3g} where m1*theta + m2 passes pi, "
                         f"at theta={theta0:.3f}); use m1 <= 1 (1 for ArcFace / CosFace) with m2 in [0, pi/2] "
                         "and/or m3")


class CombinedMargin(nn.Module):
    """s * (cos(m1*theta + m2) - m3) on targets, s * cos elsewhere.

    Args:
        scale: s, multiplies every logit.
        m1, m2, m3: multiplicative angular, additive angular, additive cosine margins.
        straight_through: if True, the margin changes the value of the target logit but its
            gradient is taken as if no margin were applied (d logit / d cos = s), the trick some
            face codebases use implicitly by editing logits in place under no_grad.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.0, m3: float = 0.0,
                 straight_through: bool = False) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"margin scale must be > 0, got {scale}")
        check_monotone(float(m1), float(m2))
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)
        self.straight_through = bool(straight_through)

    @property
    def is_identity(self) -> bool:
        return self.m1 == 1.0 and self.m2 == 0.0 and self.m3 == 0.0

    def target_logit(self, cos: Tensor) -> Tensor:
        """Margined cosine of target entries (before scaling), elementwise."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            out = cos - self.m3
        else:
            theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
            angle = self.m1 * theta + self.m2
            out = torch.where(angle <= math.pi, torch.cos(angle) - self.m3,
                              cos - self.m3 - self.m2 * math.sin(self.m2))
        if self.straight_through:
            out = cos + (out - cos).detach()
        return out

    def forward(self, cos: Tensor, targets: Tensor) -> Tensor:
        if self.is_identity:
            return cos * self.scale
        if targets.dtype == torch.bool:
            return torch.where(targets, self.target_logit(cos), cos) * self.scale
        return _TargetColumnMargin.apply(cos, targets, self)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}"


class _TargetColumnMargin(torch.autograd.Function):
    """(cos [B, N], target columns [B] (-1: none), margin) -> logits [B, N] = s * cos with each row's target
    entry replaced by s * target_logit(cos). The backward is s * grad with the B target entries multiplied by
    d target_logit / d cos (taken by autograd on the [B] target cosines): no [B, N] zeros, gathers or sums of
    gradients (what gather + scatter under autograd cost: two fills and two adds of [B, N] per step)."""

    @staticmethod
    def forward(ctx, cos: Tensor, targets: Tensor, margin: "CombinedMargin") -> Tensor:
        has = (targets >= 0).unsqueeze(1)
        col = targets.clamp(min=0).unsqueeze(1)
        picked = cos.gather(1, col)  # [B, 1]
        with torch.enable_grad():
            leaf = picked.detach().requires_grad_()
            tgt = margin.target_logit(leaf)
            (slope,) = torch.autograd.grad(tgt.sum(), leaf)
        tgt = torch.where(has, tgt.detach(), picked)
        ctx.save_for_backward(col, torch.where(has, slope, torch.ones_like(slope)))
        ctx.scale = margin.scale
        return (cos * margin.scale).scatter_(1, col, tgt * margin.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        col, slope = ctx.saved_tensors
        out = grad * ctx.scale
        return out.scatter_(1, col, out.gather(1, col) * slope), None, None


def make_margin(kind: str, scale: float = 64.0, margin: float | tuple[float, float, float] = 0.0,
                straight_through: bool = False) -> CombinedMargin:
    """Build a margin by name: 'none' (plain scaled cosine), 'arcface', 'cosface', 'combined'.

    For 'combined' pass margin=(m1, m2, m3); for 'arcface'/'cosface' a single float.
    """
    if kind == "none":
        return CombinedMargin(scale, straight_through=straight_through)
    if kind == "combined":
        if not isinstance(margin, (tuple, list)) or len(margin) != 3:
            raise ValueError(f"margin 'combined' needs margin=(m1, m2, m3), got {margin!r}")
        m1, m2, m3 = margin
        return CombinedMargin(scale, m1, m2, m3, straight_through)
    if isinstance(margin, (tuple, list)):
        raise ValueError(f"margin {kind!r} takes one float, got {margin!r}")
    if kind == "arcface":
        return CombinedMargin(scale, 1.0, margin, 0.0, straight_through)
    if kind == "cosface":
        return CombinedMargin(scale, 1.0, 0.0, margin, straight_through)
    raise ValueError(f"unknown margin {kind!r}; choose one of none, arcface, cosface, combined")
