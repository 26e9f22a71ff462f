"""Full fully-connected classifier over all C classes: the baseline MHE is measured against.

Plain:  logits = F W^T + b;  softmax CE (single-label) or BCE (multi-label, mean over B*C).
Cosine: logits = margin(normalize(F) normalize(W)^T), e.g. ArcFace margin=(1.0, 0.5, 0.0),
CosFace margin=(1.0, 0.0, 0.4) with scale 64 (the (m1, m2, m3) convention of face codebases).
Costs D*C parameters: this is the head that does not scale, kept as the reference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.heads.base import ClassifierHead, HeadOutput, pad_topk, register_head, upcast
from mhe_scale.heads.margins import CombinedMargin
from mhe_scale.labels.targets import multi_hot


def build_margin(cosine: bool, margin: Sequence[float] | None, scale: float,
                 straight_through: bool, owner: str) -> CombinedMargin | None:
    """Shared constructor logic for heads with optional cosine logits and (m1, m2, m3) margins."""
    if margin is not None and not cosine:
        raise ValueError(f"{owner}: a margin needs cosine=True (margins act on cosine logits)")
    if margin is not None and len(margin) != 3:
        raise ValueError(f"{owner}: margin must be (m1, m2, m3), e.g. ArcFace (1.0, 0.5, 0.0); got {margin!r}")
    if not cosine:
        return None
    m1, m2, m3 = margin if margin is not None else (1.0, 0.0, 0.0)
    return CombinedMargin(scale, m1, m2, m3, straight_through)


def class_logits(features: Tensor, weight: Tensor, bias: Tensor | None, margin: CombinedMargin | None,
                 target_cols: Callable[[], Tensor] | None = None) -> Tensor:
    """features [B, D] x weight [N, D] -> logits [B, N] in fp32 (fp64 stays).

    margin None: plain F W^T + b. Otherwise cosine logits through the margin; `target_cols()`
    gives the rows' target columns (LongTensor [B], -1 none, or BoolTensor [B, N]) and is only
    called then; without it (prediction) the logits are the scaled cosines.
    """
    if margin is None:
        return F.linear(upcast(features), upcast(weight), None if bias is None else upcast(bias))
    cos = cosine_similarity(features, weight)
    if target_cols is None:
        return cos * margin.scale
    return margin(cos, target_cols())


def cosine_similarity(features: Tensor, weight: Tensor) -> Tensor:
    """features [B, D], weight [N, D] -> cos [B, N], computed in fp32 (or fp64).

    The weight is not normalised into an [N, D] copy: the product's columns are divided by the row
    norms, (f / |f|) W^T / |w_n| (the same as F.normalize on both sides, eps 1e-12), and the backward
    is one fused function (_CosineColumns): one matmul and one pass over the [N, D] rows for the
    weight's gradient (measured in the sparse-heads table of docs/benchmarks.md, before / after)."""
    return _CosineColumns.apply(F.normalize(upcast(features), dim=1), upcast(weight))


class _CosineColumns(torch.autograd.Function):
    """(unit features U [B, D], weight W [N, D]) -> cos [B, N] = (U W^T)_bn / max(|w_n|, 1e-12).

    Backward, G = dL/dcos, inv_n = 1 / max(|w_n|, 1e-12):
        dL/dU = (G * inv) W,
        dL/dw_n = inv_n sum_b G_bn u_b - inv_n^2 (sum_b G_bn cos_bn) w_n   (second term only where
        |w_n| > 1e-12; below, the clamp's gradient is zero).
    Autograd's version of the same graph makes three more passes over [N, D] (the norm's backward and
    adding its gradient to the product's). Under autocast the backward matmuls run under the same
    autocast as the forward's."""

    @staticmethod
    def forward(ctx, unit: Tensor, weight: Tensor) -> Tensor:
        norm = weight.norm(dim=1)
        inv = norm.clamp_min(1e-12).reciprocal()
        cos = torch.mm(unit, weight.t()) * inv  # out of place: an autocast (bf16) product is promoted to fp32
        device = unit.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(unit, weight, inv, cos, norm > 1e-12)
        return cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        unit, weight, inv, cos, live = ctx.saved_tensors
        scaled = grad * inv
        with torch.autocast(*ctx.autocast) if ctx.autocast else contextlib.nullcontext():
            grad_unit = torch.mm(scaled, weight.to(scaled.dtype)) if ctx.needs_input_grad[0] else None
            grad_weight = torch.mm(scaled.t(), unit.to(scaled.dtype)) if ctx.needs_input_grad[1] else None
        if grad_weight is not None:
            coef = (grad * cos).sum(0).mul_(inv * inv).neg_().masked_fill_(~live, 0.0)
            grad_weight = grad_weight.to(weight.dtype).addcmul_(weight, coef.to(weight.dtype).unsqueeze(1))
        return (None if grad_unit is None else grad_unit.to(unit.dtype)), grad_weight


@register_head("fc")
class FullyConnectedHead(ClassifierHead):
    """Linear(D, C) with softmax CE / BCE, or cosine logits with an optional margin.

    Args:
        in_features: D.
        num_classes: C.
        multilabel: BCE over C outputs (targets [B, L] padded with -1) instead of softmax CE.
        cosine: normalise features and weights (no bias); logits = scale * cos (+ margin).
        margin: (m1, m2, m3) combined margin on the target logit; needs cosine=True.
        scale: s for cosine logits.
        margin_straight_through: see CombinedMargin.straight_through.
        bias: add a bias (plain logits only).
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False, cosine: bool = False,
                 margin: Sequence[float] | None = None, scale: float = 64.0,
                 margin_straight_through: bool = False, bias: bool = True) -> None:
        super().__init__(in_features, num_classes, multilabel)
        self.margin = build_margin(cosine, margin, scale, margin_straight_through, "fc head")
        self.cosine = cosine
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if (bias and not cosine) else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cosine:
            nn.init.normal_(self.weight, std=0.01)
        else:
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def logits(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """features [B, D] -> logits [B, C] in fp32; the margin applies only when targets are given."""
        cols = None if targets is None else (
            lambda: multi_hot(targets, self.num_classes).bool() if self.multilabel else targets)
        return class_logits(features, self.weight, self.bias, self.margin, cols)

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        self.check_inputs(features, targets)
        logits = self.logits(features, targets)
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, multi_hot(targets, self.num_classes, logits.dtype))
        else:
            loss = F.cross_entropy(logits, targets)
        return HeadOutput(loss)

    def chance_loss(self) -> float | None:
        """Plain softmax CE: ln C; None for cosine logits (scale and margin move the level) and BCE."""
        return None if self.multilabel or self.cosine else math.log(self.num_classes)

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        logits = self.logits(features)
        scores = F.logsigmoid(logits) if self.multilabel else F.log_softmax(logits, dim=1)
        top, ids = scores.topk(min(k, self.num_classes), dim=1)
        return pad_topk(top, ids, k)
