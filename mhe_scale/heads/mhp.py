"""Multi-Head Product (MHP): one Linear(D, sum c_h) split into H heads, label = digits of a code.

A label y is the mixed-radix code (d_0, .., d_{H-1}) of `LabelCodec`; head h classifies d_h.
Training losses (`loss`):
  "ce"    sum_h CE(chunk_h, d_h)                                   (default, single-label)
  "bce"   BCE over the concatenated chunks against the multi-hot of all digits (mean over
          B * sum c_h; default for multi-label)
  "joint" one softmax over the concatenation, target spread evenly over the H true positions
Multi-label rows use each head's multi-hot of the digits of all the row's labels ("ce"/"joint"
normalise it into a distribution). Prediction scores a label by the sum over heads of the head's
log-probability of its digit; `product_topk` finds the exact top-k without scoring all C codes.
Multi-label caveat: digits of different labels recombine (labels (1,2) and (3,4) also raise
(1,4) and (3,2)), which is why XMC usually prefers the cascade head (MHC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.heads.base import ClassifierHead, HeadOutput, pad_topk, register_head, upcast
from mhe_scale.labels.codec import LabelCodec, factorize
from mhe_scale.labels.targets import label_pairs
from mhe_scale.labels.topk import product_topk

MHP_LOSSES = ("ce", "bce", "joint")


def resolve_sizes(num_classes: int, sizes: Sequence[int] | None, num_heads: int) -> list[int]:
    """Explicit sizes win; otherwise factorize(num_classes, num_heads)."""
    if sizes is not None and len(sizes) > 0:
        return [int(c) for c in sizes]
    return factorize(num_classes, num_heads)


@register_head("mhp")
class MultiHeadProductHead(ClassifierHead):
    """Args:
        in_features: D.
        num_classes: C.
        multilabel: targets [B, L] padded with -1.
        sizes: head sizes c_h (prod >= C); default factorize(C, num_heads).
        num_heads: H when sizes is not given.
        loss: "ce", "bce" or "joint"; default "ce" single-label, "bce" multi-label.
        bias: bias on the shared linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 sizes: Sequence[int] | None = None, num_heads: int = 2, loss: str | None = None,
                 bias: bool = True) -> None:
        super().__init__(in_features, num_classes, multilabel)
        loss = loss or ("bce" if multilabel else "ce")
        if loss not in MHP_LOSSES:
            raise ValueError(f"mhp loss must be one of {MHP_LOSSES}, got {loss!r}")
        self.loss_kind = loss
        self.codec = LabelCodec(resolve_sizes(num_classes, sizes, num_heads), num_classes)
        self.sizes = list(self.codec.sizes)
        self.offsets = [0]
        for c in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + c)
        self.linear = nn.Linear(in_features, sum(self.sizes), bias=bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sizes={self.sizes}, loss={self.loss_kind!r}"

    def head_logits(self, features: Tensor) -> list[Tensor]:
        """features [B, D] -> H fp32 tensors [B, c_h]."""
        logits = F.linear(upcast(features), upcast(self.linear.weight),
                          None if self.linear.bias is None else upcast(self.linear.bias))
        return list(logits.split(self.sizes, dim=1))

    def digit_targets(self, targets: Tensor) -> list[Tensor]:
        """Per-head multi-hot [B, c_h] of the digits of each row's labels."""
        rows, labels = label_pairs(targets if self.multilabel else targets.unsqueeze(1))
        digits = self.codec.encode(labels, check=False)
        out = []
        for h, c in enumerate(self.sizes):
            hot = torch.zeros(targets.shape[0], c, device=targets.device)
            hot[rows, digits[:, h]] = 1.0
            out.append(hot)
        return out

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        self.check_inputs(features, targets)
        chunks = self.head_logits(features)
        if not self.multilabel and self.loss_kind == "ce":
            digits = self.codec.encode(targets, check=False)
            loss = sum(F.cross_entropy(z, digits[:, h]) for h, z in enumerate(chunks))
            return HeadOutput(loss)  # type: ignore[arg-type]
        hots = self.digit_targets(targets)
        if self.loss_kind == "bce":
            loss = F.binary_cross_entropy_with_logits(torch.cat(chunks, 1), torch.cat(hots, 1))
        elif self.loss_kind == "ce":
            loss = sum(_soft_ce(z, t) for z, t in zip(chunks, hots))  # type: ignore[assignment]
        else:
            loss = _soft_ce(torch.cat(chunks, 1), torch.cat(hots, 1))
        return HeadOutput(loss)  # type: ignore[arg-type]

    def head_scores(self, features: Tensor) -> list[Tensor]:
        """Per-head log-scores [B, c_h] whose sum over a label's digits is its score."""
        chunks = self.head_logits(features)
        if self.loss_kind == "bce":
            return [F.logsigmoid(z) for z in chunks]
        if self.loss_kind == "joint":
            return list(F.log_softmax(torch.cat(chunks, 1), dim=1).split(self.sizes, dim=1))
        return [F.log_softmax(z, dim=1) for z in chunks]

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores, ids = product_topk(self.head_scores(features), self.codec, k)
        return pad_topk(scores, ids, k)

    def chance_loss(self) -> float | None:
        """Single-label CE: the loss of a model that predicts only each head's digit frequencies (balanced
        labels), sum_h H(d_h) (ln C when prod(c_h) = C); None for bce / joint / multi-label."""
        if self.multilabel or self.loss_kind != "ce":
            return None
        return uniform_digit_entropy(self.num_classes, self.sizes)


def _soft_ce(logits: Tensor, hot: Tensor) -> Tensor:
    """Cross-entropy against the normalised multi-hot; rows without labels contribute 0."""
    mass = hot.sum(1, keepdim=True)
    target = hot / mass.clamp(min=1.0)
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(1)
    return per_row.sum() / logits.shape[0]


def uniform_digit_entropy(num_classes: int, sizes: Sequence[int]) -> float:
    """Sum over heads of the entropy of digit d_h(y) = (y // prod(c_{h+1..})) % c_h for y uniform on [0, C):
    the MHP cross-entropy (sum of per-head CEs) of a model that predicts only the digit frequencies."""
    total, below = 0.0, math.prod(sizes)
    for c in sizes:
        below //= c  # prod of the sizes after this head
        cycle = below * c
        digits = torch.arange(c, dtype=torch.float64)
        counts = (num_classes // cycle) * below + (num_classes % cycle - digits * below).clamp(0, below)
        p = counts[counts > 0] / num_classes
        total += float(-(p * p.log()).sum())
    return total
