"""Multi-Head Cascade (MHC): coarse-to-fine prefix levels, each scoring only what the level above kept.

Levels h = 0..H-1 follow the codec's sizes c_h (head 0 most significant, see LabelCodec): the
level-h prefix of label y is p_h(y) = y // stride_h (its digits 0..h); level 0 are the groups,
the last level the labels themselves. Only prefixes holding at least one real label exist,
n_h = ceil(C / stride_h) of them, so padding codes (>= C) own no parameters and are never scored,
selected or returned.
    level 0:  logits = Linear(D, n_0)(f) over all groups (n_0 = c_0 unless whole groups are padding)
    level h:  logit(p) = <proj_h(f), E_h[p]> (+ bias_h[p]),  proj_h = Linear(D, hidden), E_h [n_h, hidden],
              evaluated only for the c_h children of each prefix kept at level h-1.
Multi-label (BCE): every level keeps K = top_k_groups prefixes. In training the row's true prefixes
come first (a row with more than K keeps the K with the best path score), then the best-scoring
false ones (hard negatives, LightXML style). Loss = sum_h mean over level h's real candidates of
BCE(logit, is-true); level 0's candidates are all groups. `level_weights` w_h scale the terms
(default all 1): the levels share the encoder, and on small label sets an unweighted group term
can dominate it (docs/benchmarks.md, Bibtex). Path score = sum_h logsigmoid(logit_h),
for two levels log(sigmoid(group) * sigmoid(label)); selection and prediction rank by it.
Single-label (CE, teacher forcing, K = 1): CE over all groups + sum_h CE over the children of the
row's true prefix. Path score = sum_h log_softmax over siblings.
predict is a beam search keeping `beam` prefixes per level: with two levels it is exact among the
labels of the top `beam` groups, and exact over all C when beam >= every level's prefix count.
Memory per step: O(B * n_0 + B * K * c_h * hidden), never O(B * C).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.heads.base import ClassifierHead, HeadOutput, pad_topk, register_head
from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_on_state_dict
from mhe_scale.labels.codec import PAD, LabelCodec, factorize


def cascade_sizes(num_classes: int, sizes: Sequence[int] | None, num_heads: int,
                  num_groups: int | None) -> list[int]:
    """Level sizes: (G, ceil(C/G)) from num_groups, else explicit sizes, else factorize(C, num_heads)."""
    sizes = [int(c) for c in sizes] if sizes is not None and len(sizes) > 0 else None
    if num_groups is not None:
        if not 1 <= num_groups <= num_classes:
            raise ValueError(f"mhc num_groups must be in [1, num_classes={num_classes}], got {num_groups}")
        derived = [int(num_groups), -(-num_classes // num_groups)]
        if sizes is not None and (len(sizes) != 2 or sizes[0] != num_groups):
            raise ValueError(f"mhc num_groups={num_groups} disagrees with sizes={sizes} (sizes[0] is the group "
                             f"count of a two-level cascade); give only one, e.g. sizes={derived}")
        if sizes is None and num_heads != 2:
            raise ValueError(f"mhc num_groups={num_groups} implies two levels (sizes {derived}) but num_heads="
                             f"{num_heads}; for {num_heads} levels drop num_groups and give sizes")
        return sizes if sizes is not None else derived
    if sizes is not None:
        if len(sizes) < 2:
            raise ValueError(f"mhc needs at least two levels, got sizes={sizes}; use the 'fc' head for one")
        return sizes
    if num_heads < 2:
        raise ValueError(f"mhc needs num_heads >= 2, got {num_heads}")
    return factorize(num_classes, num_heads)


def warn_unused_groups(num_classes: int, num_groups: int, used: int) -> None:
    """Warn when num_groups asks for more groups than the labels fill (only `used` groups hold a label)."""
    if used < num_groups:
        warnings.warn(f"mhc head.num_groups={num_groups} asks for {num_groups} groups, but {num_classes} classes in "
                      f"groups of ceil({num_classes}/{num_groups}) = {-(-num_classes // num_groups)} fill only "
                      f"{used}; using {used} groups. For exactly G groups pick G with ceil(C / ceil(C / G)) = G "
                      f"(e.g. a divisor of C={num_classes}), or give head.sizes", UserWarning, stacklevel=3)


def select_candidates(scores: Tensor, is_true: Tensor, k: int) -> Tensor:
    """Positions [B, k] to keep from scores [B, M]: true entries first (best first), then the best false."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    truth_first = is_true.gather(1, order).to(torch.uint8).argsort(dim=1, descending=True, stable=True)
    return order.gather(1, truth_first[:, :k])


def check_level_weights(weights: Sequence[float] | None, levels: int) -> list[float]:
    """One finite weight >= 0 per level, not all zero; None -> all 1."""
    if weights is None:
        return [1.0] * levels
    out = [float(w) for w in weights]
    if len(out) != levels or not all(math.isfinite(w) and w >= 0 for w in out) or not any(out):
        raise ValueError(f"mhc level_weights must be {levels} finite numbers >= 0 (one per level, not all "
                         f"zero), got {list(weights)}; e.g. {[0.3] + [1.0] * (levels - 1)}")
    return out


@dataclass
class CascadeLevel:
    """What one level scored in training: prefix codes [B, M], logits [B, M] (garbage where not
    valid), valid [B, M] (code names a real prefix), is_true [B, M] (prefix of one of the row's labels)."""

    codes: Tensor
    logits: Tensor
    valid: Tensor
    is_true: Tensor


@register_head("mhc")
class MultiHeadCascadeHead(ClassifierHead):
    """Args:
        in_features: D.
        num_classes: C.
        multilabel: BCE cascade, targets [B, L] padded with -1; else CE with teacher forcing.
        sizes: level sizes c_h (prod >= C, at least two); default factorize(C, num_heads).
        num_heads: H when neither sizes nor num_groups is given.
        num_groups: G, the LightXML convention: sizes (G, ceil(C / G)); must agree with sizes if both.
        top_k_groups: K prefixes kept per level in multi-label training (unused single-label).
        hidden: width of the projections and prefix embeddings of levels 1..H-1.
        beam: prefixes kept per level by predict; default 10 single-label, top_k_groups multi-label.
        label_bias: a learned bias per prefix on levels 1..H-1.
        level_weights: w_h >= 0 per level, loss = sum_h w_h * loss_h; default all 1.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 sizes: Sequence[int] | None = None, num_heads: int = 2, num_groups: int | None = None,
                 top_k_groups: int = 10, hidden: int = 300, beam: int | None = None,
                 label_bias: bool = True, level_weights: Sequence[float] | None = None) -> None:
        super().__init__(in_features, num_classes, multilabel)
        for name, value in (("top_k_groups", top_k_groups), ("hidden", hidden), ("beam", beam)):
            if value is not None and value < 1:
                raise ValueError(f"mhc {name} must be >= 1, got {value}")
        self.codec = LabelCodec(cascade_sizes(num_classes, sizes, num_heads, num_groups), num_classes)
        self.sizes = list(self.codec.sizes)
        self.level_weights = check_level_weights(level_weights, len(self.sizes))
        self.num_prefixes = [-(-num_classes // s) for s in self.codec.strides]  # n_h; last = C
        if num_groups is not None:
            warn_unused_groups(num_classes, int(num_groups), self.num_prefixes[0])
        self.top_k_groups = int(top_k_groups)
        self.hidden = int(hidden)
        self.beam = int(beam) if beam is not None else (self.top_k_groups if multilabel else 10)
        levels = range(1, len(self.sizes))
        self.group_layer = nn.Linear(in_features, self.num_prefixes[0])
        self.proj = nn.ModuleList(nn.Linear(in_features, hidden) for _ in levels)
        self.embed = nn.ModuleList(nn.Embedding(self.num_prefixes[h], hidden) for h in levels)
        self.prefix_bias = (nn.ParameterList(nn.Parameter(torch.zeros(self.num_prefixes[h])) for h in levels)
                            if label_bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in self.embed:
            nn.init.normal_(table.weight, std=self.hidden ** -0.5)
        if self.prefix_bias is not None:
            for bias in self.prefix_bias:
                nn.init.zeros_(bias)

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Mark the label table (last level's embedding and bias) for row-sparse updates
        (mhe_scale.optim) and return it; the other parameters keep dense updates."""
        refresh_on_state_dict(self.embed[-1])
        params = [self.embed[-1].weight] + ([] if self.prefix_bias is None else [self.prefix_bias[-1]])
        if self.prefix_bias is not None:
            refresh_on_state_dict(self.prefix_bias)
        for p in params:
            enable_row_sparse(p)
        return params

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sizes={self.sizes}, prefixes={self.num_prefixes}, "
                f"top_k_groups={self.top_k_groups}, hidden={self.hidden}, beam={self.beam}, "
                f"level_weights={self.level_weights}")

    # ------------------------------------------------------------------ scoring pieces
    def _dtype(self, features: Tensor) -> torch.dtype:
        """fp32 at least (fp64 stays fp64, for reference tests)."""
        return torch.promote_types(torch.promote_types(features.dtype, self.group_layer.weight.dtype), torch.float32)

    def group_logits(self, features: Tensor) -> Tensor:
        """features [B, D] -> level-0 logits [B, n_0]."""
        dt = self._dtype(features)
        layer = self.group_layer
        return F.linear(features.to(dt), layer.weight.to(dt), layer.bias.to(dt))

    def queries(self, features: Tensor) -> list[Tensor]:
        """features [B, D] -> proj_h(f) [B, hidden] for levels 1..H-1 (index h-1)."""
        dt = self._dtype(features)
        f = features.to(dt)
        return [F.linear(f, p.weight.to(dt), p.bias.to(dt)) for p in self.proj]

    def prefix_logits(self, level: int, query: Tensor, codes: Tensor) -> Tensor:
        """Level >= 1 logits [B, M] of prefix codes [B, M] (codes >= n_h give garbage: mask them)."""
        safe = codes.clamp(0, self.num_prefixes[level] - 1)
        rows = gather_rows(self.embed[level - 1].weight, safe).to(query.dtype)  # [B, M, hidden]: gathered rows only
        logits = torch.bmm(rows, query.unsqueeze(2)).squeeze(2)
        if self.prefix_bias is not None:
            logits = logits + gather_rows(self.prefix_bias[level - 1], safe).to(query.dtype)
        return logits

    def child_codes(self, parents: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """Prefix codes [B, P] at level-1 -> children codes [B, P * c_level] and their valid mask."""
        c = self.sizes[level]
        codes = (parents.unsqueeze(2) * c + torch.arange(c, device=parents.device)).flatten(1)
        return codes, codes < self.num_prefixes[level]

    def level_scores(self, level: int, logits: Tensor, valid: Tensor) -> Tensor:
        """Per-candidate log-score added to the parent's path score; -inf where not valid."""
        if self.multilabel:
            return F.logsigmoid(logits).masked_fill(~valid, float("-inf"))
        c = self.sizes[level] if level > 0 else logits.shape[1]
        masked = logits.masked_fill(~valid, float("-inf")).unflatten(1, (-1, c))
        # children of a padding parent are all masked: their NaNs are replaced by -inf below
        return F.log_softmax(masked, dim=2).flatten(1).masked_fill(~valid, float("-inf"))

    # ------------------------------------------------------------------ training
    def _true_prefixes(self, targets: Tensor, level: int) -> Tensor:
        """Sorted level prefixes of each row's labels [B, L] (PAD stays -1, sorts first)."""
        labels = targets if self.multilabel else targets.unsqueeze(1)
        stride = self.codec.strides[level]
        return torch.where(labels >= 0, torch.div(labels, stride, rounding_mode="floor"), PAD).sort(dim=1).values

    @staticmethod
    def _member(codes: Tensor, sorted_true: Tensor) -> Tensor:
        """codes [B, M] in the row's sorted_true [B, L]? -> bool [B, M] (O(B*M*log L))."""
        if sorted_true.shape[1] == 0:
            return torch.zeros_like(codes, dtype=torch.bool)
        codes = codes.contiguous()
        pos = torch.searchsorted(sorted_true, codes).clamp(max=sorted_true.shape[1] - 1)
        return sorted_true.gather(1, pos) == codes

    def cascade(self, features: Tensor, targets: Tensor) -> list[CascadeLevel]:
        """Training candidates and logits of every level (ground truth forced in, see module doc)."""
        targets = targets.long()
        b = features.shape[0]
        queries = self.queries(features)
        codes = torch.arange(self.num_prefixes[0], device=features.device).expand(b, -1)
        logits = self.group_logits(features)
        valid = torch.ones_like(codes, dtype=torch.bool)
        parents, parent_path = codes[:, :1], logits.new_zeros(b, 1)
        levels: list[CascadeLevel] = []
        for h in range(len(self.sizes)):
            if h > 0:
                codes, valid = self.child_codes(parents, h)
                logits = self.prefix_logits(h, queries[h - 1], codes)
            is_true = self._member(codes, self._true_prefixes(targets, h))
            levels.append(CascadeLevel(codes, logits, valid, is_true))
            if h == len(self.sizes) - 1:
                break
            if self.multilabel:
                path = parent_path.repeat_interleave(codes.shape[1] // parent_path.shape[1], dim=1)
                path = path + self.level_scores(h, logits.detach(), valid)
                keep = select_candidates(path, is_true, min(self.top_k_groups, codes.shape[1]))
                parents, parent_path = codes.gather(1, keep), path.gather(1, keep)
            else:  # teacher forcing: expand the true prefix only
                parents = torch.div(targets, self.codec.strides[h], rounding_mode="floor").unsqueeze(1)
        return levels

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        self.check_inputs(features, targets)
        levels = self.cascade(features, targets)
        losses = []
        if self.multilabel:
            for lv in levels:
                bce = F.binary_cross_entropy_with_logits(lv.logits, lv.is_true.to(lv.logits.dtype), reduction="none")
                losses.append(bce.masked_fill(~lv.valid, 0.0).sum() / lv.valid.sum())
        else:
            digits = self.codec.encode(targets.long(), check=False)  # position of the true child
            for h, lv in enumerate(levels):
                losses.append(F.cross_entropy(lv.logits.masked_fill(~lv.valid, float("-inf")), digits[:, h]))
        loss = sum(w * x for w, x in zip(self.level_weights, losses))
        return HeadOutput(loss, {f"loss_level{h}": x.detach() for h, x in enumerate(losses)})

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Beam search, `beam` prefixes per level; scores are path log-scores, ids global labels."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        b = features.shape[0]
        queries = self.queries(features)
        codes = torch.arange(self.num_prefixes[0], device=features.device).expand(b, -1)
        logits = self.group_logits(features)
        path = self.level_scores(0, logits, torch.ones_like(codes, dtype=torch.bool))
        for h in range(1, len(self.sizes)):
            path, keep = path.topk(min(self.beam, path.shape[1]), dim=1)
            codes, valid = self.child_codes(codes.gather(1, keep), h)
            logits = self.prefix_logits(h, queries[h - 1], codes)
            path = path.repeat_interleave(self.sizes[h], dim=1) + self.level_scores(h, logits, valid)
        top, pos = path.topk(min(k, path.shape[1]), dim=1)
        ids = codes.gather(1, pos)
        bad = ids >= self.num_classes
        return pad_topk(top.masked_fill(bad, float("-inf")), ids.masked_fill(bad, -1), k)
