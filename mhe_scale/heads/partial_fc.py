"""Partial FC: cosine-margin softmax over the batch's classes plus sampled negatives.

Each training step keeps every class that occurs in the batch's labels (positives) and fills up
with negatives drawn uniformly without replacement, so the softmax covers
    N = max(#positives, ceil(sample_rate * C))
classes; labels are remapped to their column among the kept classes. sample_rate=1.0 keeps all
C classes and is exactly the full cosine-margin softmax (the fc head with cosine=True).
Evaluation (module.eval()) and predict always use all C classes. Logits are fp32 (fp64 stays fp64).

`sample_classes` is a pure function of (labels, C, N, generator) so a class-sharded version can
run it on each rank's local class range (labels of other shards are simply "not here").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.heads.base import ClassifierHead, HeadOutput, pad_topk, register_head
from mhe_scale.heads.linear import build_margin, cosine_similarity
from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_all, refresh_on_state_dict


def sample_classes(labels: Tensor, num_classes: int, num_sample: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Keep every class in `labels`, add uniform negatives up to `num_sample` classes in total.

    Args:
        labels: [B] class ids; entries outside [0, num_classes) are "not here" (e.g. owned by
            another shard): they are not kept and remap to -1.
        num_classes: C, the classes to choose from.
        num_sample: wanted number of kept classes; the result has max(#positives, num_sample)
            classes, at most C.
        generator: RNG on labels' device; None uses the global RNG. Nothing is drawn when
            num_sample >= C.
    Returns:
        kept: [N] sorted class ids; remapped: [B] column of each label in `kept` (-1: not here).
    No host sync when num_sample >= B; otherwise one (the number of positives decides N).
    """
    if num_classes < 1:
        raise ValueError(f"sample_classes: num_classes must be >= 1, got {num_classes}")
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    if num_sample >= num_classes:
        kept = torch.arange(num_classes, device=labels.device)
        return kept, torch.where(valid, labels, -1)
    # uniform scores in [0, 1) for every class, positives forced to 2 so topk keeps them first;
    # slot C is a bin for labels that are not here, so no boolean indexing (no extra sync)
    scores = torch.rand(num_classes + 1, generator=generator, device=labels.device)
    scores.index_fill_(0, torch.where(valid, labels, num_classes), 2.0)
    scores = scores[:num_classes]
    if num_sample >= labels.numel():  # positives <= B <= num_sample: N is known without reading the device
        count = min(num_classes, int(num_sample))
    else:
        count = min(num_classes, max(int((scores > 1.0).sum()), int(num_sample)))  # one host sync
    kept = scores.topk(count, sorted=False).indices.sort().values
    cols = torch.searchsorted(kept, labels.clamp(0, num_classes - 1))
    return kept, torch.where(valid, cols, -1)


@register_head("partial_fc")
class PartialFCHead(ClassifierHead):
    """Cosine classifier [C, D] trained on a sampled subset of classes each step (single-label).

    Logits are always cosine: scale * cos, with the (m1, m2, m3) margin on the target column.

    Args:
        in_features: D.
        num_classes: C.
        multilabel: must be False (Partial FC is a single-label softmax baseline).
        margin: (m1, m2, m3) combined margin, default ArcFace (1.0, 0.5, 0.0); None = no margin.
        scale: s for the cosine logits.
        sample_rate: fraction of classes in each training softmax, in (0, 1]; positives of the
            batch are always kept, so a step may keep more.
        margin_straight_through: see CombinedMargin.straight_through.
    Attribute `generator` (default None = global RNG): set a torch.Generator to draw from it.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 margin: Sequence[float] | None = (1.0, 0.5, 0.0), scale: float = 64.0,
                 sample_rate: float = 0.1, margin_straight_through: bool = False) -> None:
        super().__init__(in_features, num_classes, multilabel)
        if multilabel:
            raise ValueError("partial_fc head is single-label (softmax); for multi-label use the fc, "
                             "mhp or mhc head, or set multilabel=False")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"partial_fc sample_rate must be in (0, 1], got {sample_rate}; "
                             "1.0 is the full softmax")
        margin_module = build_margin(True, margin, scale, margin_straight_through, "partial_fc head")
        assert margin_module is not None
        self.margin = margin_module
        self.sample_rate = float(sample_rate)
        self.num_sample = min(num_classes, math.ceil(self.sample_rate * num_classes))
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.generator: torch.Generator | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.01)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sample_rate={self.sample_rate}, num_sample={self.num_sample}"

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Mark the weight for row-sparse updates (mhe_scale.optim) and return it: a training step then
        gathers only the kept rows into a leaf (no [C, D] gradient) and the optimizer updates those rows."""
        refresh_on_state_dict(self)
        enable_row_sparse(self.weight)
        return [self.weight]

    def logits(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """All C classes: features [B, D] -> logits [B, C] fp32; margin only when targets are given."""
        cos = cosine_similarity(features, refresh_all(self.weight))
        return cos * self.margin.scale if targets is None else self.margin(cos, targets)

    def sampled_logits(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training softmax: -> (logits [B, N] fp32, target columns [B], kept class ids [N])."""
        kept, cols = sample_classes(targets, self.num_classes, self.num_sample, self.generator)
        cos = cosine_similarity(features, gather_rows(self.weight, kept, unique=True))
        return self.margin(cos, cols), cols, kept

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        self.check_inputs(features, targets)
        if self.training:  # sample_rate=1: kept = all classes in order, no draw
            logits, cols, kept = self.sampled_logits(features, targets)
            num_kept = kept.numel()
        else:
            logits, cols, num_kept = self.logits(features, targets), targets.long(), self.num_classes
        loss = F.cross_entropy(logits, cols)
        return HeadOutput(loss, {"kept_classes": torch.tensor(float(num_kept))})

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scores = F.log_softmax(self.logits(features), dim=1)
        top, ids = scores.topk(min(k, self.num_classes), dim=1)
        return pad_topk(top, ids, k)
