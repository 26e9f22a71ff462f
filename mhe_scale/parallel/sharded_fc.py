"""Class-sharded full FC and Partial FC heads: rank r holds the weight rows of classes [start, end).

Both all-gather the features (with grad) and labels (without), score the GLOBAL batch against the
local rows only (logits [B, C_r], never [B, C]) and reduce with the sharded losses, so the loss
equals the single-process head's on the concatenated batch (see sharded_heads.py for the
conventions and the W-independent init).

Partial FC, sharded: rank r keeps every class of its range that occurs in the global batch (the
owner of a class always keeps it) and tops up with uniform negatives of its own range to
n_r = ceil(sample_rate * C_r) classes; the softmax runs over the union of the ranks' kept sets.
A row's target sits in exactly one rank's kept set (its owner's), so the distributed softmax sees
each valid target once. Ranks keep different numbers of classes: `ragged_cross_entropy` pads
them to a common width with -inf columns and one all-reduce of B int64 tells every rank where
each row's target column is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from mhe_scale.heads.base import HeadOutput
from mhe_scale.heads.linear import build_margin, class_logits, cosine_similarity
from mhe_scale.heads.partial_fc import sample_classes
from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_all, refresh_on_state_dict
from mhe_scale.parallel.losses import local_multi_hot, sharded_bce_with_logits, sharded_cross_entropy, sharded_topk
from mhe_scale.parallel.sharded_heads import (ShardedHead, block_seed, distinct_per_rank, global_logsumexp,
                                              init_rows_, kept_widths, normal_fill, param, ragged_cross_entropy, uniform_fill)


class ShardedFullyConnectedHead(ShardedHead):
    """FullyConnectedHead with its [C, D] weight (and bias) sharded by class range over `group`.

    Args (as FullyConnectedHead unless noted):
        in_features: D.
        num_classes: C (global).
        multilabel: BCE over all C outputs, targets [b_r, L] padded with -1 (L may differ per rank).
        cosine, margin, scale, margin_straight_through, bias: see FullyConnectedHead.
        group: process group the classes are sharded over; None = one process (same math).
        grad_scale: backward factor of the feature all-gather; None = W (DDP/ZeRO-averaged
            backbone), 1.0 = exact d loss / d features.
        init_seed: seed of the W-independent block init (sharded_heads.init_rows_); same
            distributions as FullyConnectedHead (U(+-D^-1/2), or N(0, 0.01^2) when cosine).
    Cost per step: all-gather of the batch's features and labels; logits [B, C_r]; the sharded
    loss's all-reduces (2 for CE, 1 for BCE) and, in backward, one all-reduce of [B, D].
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False, cosine: bool = False,
                 margin: Sequence[float] | None = None, scale: float = 64.0, margin_straight_through: bool = False,
                 bias: bool = True, group: ProcessGroup | None = None, grad_scale: float | None = None,
                 init_seed: int = 0) -> None:
        super().__init__(in_features, num_classes, multilabel, num_classes, group, grad_scale, init_seed)
        self.margin = build_margin(cosine, margin, scale, margin_straight_through, "sharded fc head")
        self.cosine = cosine
        self.weight = param((self.plan.count, in_features))
        self.bias = param((self.plan.count,)) if (bias and not cosine) else None
        self.sharded_parameters = ("weight",) if self.bias is None else ("weight", "bias")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fill = normal_fill(0.01) if self.cosine else uniform_fill(self.in_features ** -0.5)
        init_rows_(self.weight, self.plan.start, self.init_seed, fill)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def local_logits(self, features: Tensor, targets: Tensor | None = None) -> Tensor:
        """Global batch features [B, D] -> this rank's logits [B, C_r] fp32 (fp64 stays); the margin
        applies when the global targets are given."""
        cols = None if targets is None else (
            lambda: local_multi_hot(targets, self.plan).bool() if self.multilabel else self.plan.to_local(targets))
        return class_logits(features, self.weight, self.bias, self.margin, cols)

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """features [b_r, D], targets [b_r] or [b_r, L] -> the global mean loss (same on every rank)."""
        features, targets, _ = self.gather(features, targets)
        logits = self.local_logits(features, targets)
        if self.multilabel:
            hot = local_multi_hot(targets, self.plan, logits.dtype)
            return HeadOutput(sharded_bce_with_logits(logits, hot, self.num_classes, self.group))
        return HeadOutput(sharded_cross_entropy(logits, targets, self.plan, self.group))

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's rows: top-k log-softmax (log-sigmoid if multilabel) scores over all C classes."""
        gathered, mine = self.gather_features(features)
        logits = self.local_logits(gathered)
        if self.multilabel:
            scores = F.logsigmoid(logits)
        else:
            scores = logits - global_logsumexp(logits, self.group).unsqueeze(1)
        top, ids = sharded_topk(scores, k, self.plan, self.group)
        return top[mine], ids[mine]


class ShardedPartialFCHead(ShardedHead):
    """PartialFCHead with its [C, D] weight sharded by class range; sampling per rank (module doc).

    Args (as PartialFCHead unless noted):
        in_features, num_classes, multilabel (must be False), margin, scale, margin_straight_through.
        sample_rate: each rank keeps max(#its classes in the batch, ceil(sample_rate * C_r)) classes.
        group, grad_scale, init_seed: see ShardedFullyConnectedHead (init N(0, 0.01^2)).
        sample_seed: the negatives' generator on rank r is seeded with block_seed(sample_seed, r),
            so ranks draw independently. Set the attribute `generator` to draw from your own.
    Evaluation (module.eval()) and predict use all C classes.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 margin: Sequence[float] | None = (1.0, 0.5, 0.0), scale: float = 64.0, sample_rate: float = 0.1,
                 margin_straight_through: bool = False, group: ProcessGroup | None = None,
                 grad_scale: float | None = None, init_seed: int = 0, sample_seed: int = 0) -> None:
        super().__init__(in_features, num_classes, multilabel, num_classes, group, grad_scale, init_seed)
        if multilabel:
            raise ValueError("sharded partial_fc head is single-label (softmax); set multilabel=False")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"partial_fc sample_rate must be in (0, 1], got {sample_rate}; 1.0 is the full softmax")
        margin_module = build_margin(True, margin, scale, margin_straight_through, "sharded partial_fc head")
        assert margin_module is not None
        self.margin = margin_module
        self.sample_rate = float(sample_rate)
        self.sample_counts = [min(c, math.ceil(self.sample_rate * c)) for _, c in self.plan.all_ranges()]
        self.sample_seed = int(sample_seed)
        self.generator: torch.Generator | None = None
        self.weight = param((self.plan.count, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_rows_(self.weight, self.plan.start, self.init_seed, normal_fill(0.01))

    def row_sparse_parameters(self) -> list[torch.nn.Parameter]:
        """Mark the shard's weight for row-sparse updates (mhe_scale.optim) and return it."""
        refresh_on_state_dict(self)
        enable_row_sparse(self.weight)
        return [self.weight]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sample_rate={self.sample_rate}, "
                f"local_samples={self.sample_counts[self.plan.rank]}")

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(block_seed(self.sample_seed, self.plan.rank))
        return self.generator

    def sample(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Global labels [B] -> (kept local columns [n_r] sorted, target column [B] in them or -1,
        every rank's n [W], computed locally from the labels: no communication)."""
        plan = self.plan
        kept, cols = sample_classes(labels - plan.start, plan.count, self.sample_counts[plan.rank],
                                    self._generator(labels.device))
        positives = distinct_per_rank(labels, plan)
        wants = torch.tensor(self.sample_counts, device=labels.device)
        counts = torch.minimum(torch.maximum(positives, wants), torch.tensor([c for _, c in plan.all_ranges()],
                                                                             device=labels.device))
        return kept, cols, counts

    def kept_classes(self, labels: Tensor) -> Tensor:
        """The global ids this rank would keep for global labels [B] (draws from `generator`)."""
        return self.sample(labels.long())[0] + self.plan.start

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """features [b_r, D], labels [b_r] -> global mean CE over the union of the ranks' kept classes
        (all classes in eval mode); metrics["kept_classes"]: the softmax width summed over ranks."""
        features, labels, _ = self.gather(features, targets)
        if self.training:
            kept, cols, counts = self.sample(labels)
            logits = self.margin(cosine_similarity(features, gather_rows(self.weight, kept, unique=True)), cols)
            width, total = kept_widths(counts, self.sample_counts, [c for _, c in self.plan.all_ranges()],
                                       labels.numel())
            loss = ragged_cross_entropy(logits, cols, width, self.group)
            count = float(total)
        else:
            logits = self.margin(cosine_similarity(features, refresh_all(self.weight)), self.plan.to_local(labels))
            loss = sharded_cross_entropy(logits, labels, self.plan, self.group)
            count = float(self.num_classes)
        return HeadOutput(loss, {"kept_classes": torch.tensor(count)})

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's rows: top-k log-softmax scores of the full cosine classifier (no margin)."""
        gathered, mine = self.gather_features(features)
        logits = cosine_similarity(gathered, refresh_all(self.weight)) * self.margin.scale
        scores = logits - global_logsumexp(logits, self.group).unsqueeze(1)
        top, ids = sharded_topk(scores, k, self.plan, self.group)
        return top[mine], ids[mine]
