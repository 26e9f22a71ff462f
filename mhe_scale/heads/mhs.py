"""Multi-Head Sampling (MHS): a two-level label code whose training softmax sees sampled groups.

Sizes (c_1, c_2), c_1 * c_2 >= C: label y has group g = y // c_2 and member r = y % c_2 (the
digits of LabelCodec(sizes)); codes >= C are padding. The weight [c_1, c_2, D] holds one row per
(group, member) code. A training softmax covers only whole groups:
  "per_sample"   each row: its true group + (M - 1) other groups drawn uniformly for that row,
                 M * c_2 logits per row (the union of the rows' groups is read once and scored
                 per row in chunks: no [B, M * c_2, D] per-row copy of the weights);
  "batch_union"  all rows share one softmax over the groups present in the batch, topped up with
                 uniform groups to M in total if the batch has fewer (Partial FC on groups).
Padding codes inside a kept group get logit -inf (no probability, no gradient). Groups made only
of padding codes are never sampled. Logits are plain (F W^T + b) or cosine with a margin as in
the fc head, computed in fp32 (fp64 stays fp64). In eval mode and in predict the head is the
full classifier over all C labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.heads.base import ClassifierHead, HeadOutput, pad_topk, register_head, upcast
from mhe_scale.heads.linear import build_margin, cosine_similarity
from mhe_scale.heads.partial_fc import sample_classes
from mhe_scale.labels.codec import LabelCodec, factorize
from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_all, refresh_on_state_dict

MHS_MODES = ("per_sample", "batch_union")
PREDICT_CHUNK_COLUMNS = 1 << 16
"""predict scores about this many codes at a time (memory O(B * this), not O(B * C))."""


def sample_groups_per_row(groups: Tensor, num_groups: int, num_sampled: int,
                          generator: torch.Generator | None = None) -> Tensor:
    """Per row: its own group first, then (num_sampled - 1) distinct other groups, uniformly.

    groups [B] in [0, num_groups) -> [B, M] group ids, M = min(num_sampled, num_groups),
    column 0 == groups. Costs one [B, num_groups] draw from `generator` (None: global RNG).
    """
    count = min(int(num_sampled), num_groups)
    if count < 1:
        raise ValueError(f"sample_groups_per_row: num_sampled must be >= 1, got {num_sampled}")
    scores = torch.rand(groups.shape[0], num_groups, generator=generator, device=groups.device)
    scores.scatter_(1, groups.long().unsqueeze(1), 2.0)  # the true group outranks every draw in [0, 1)
    return scores.topk(count, dim=1).indices  # sorted: the true group is column 0


def finish_logits(logits: Tensor, margin: nn.Module | None, cols: Tensor | None) -> Tensor:
    """Cosine heads (margin given): the margin at target columns `cols`, or just its scale when there
    are none; plain logits (margin None) pass through."""
    if margin is None:
        return logits
    if cols is None or logits.shape[1] == 0:
        return logits * margin.scale
    return margin(logits, cols)


def shared_group_logits(weight: Tensor, bias: Tensor | None, features: Tensor, groups: Tensor,
                        margin: nn.Module | None, cols: Tensor | None = None) -> Tensor:
    """weight [G, c_2, D]: one softmax for all rows over the codes of `groups` [N] -> [B, N * c_2]
    fp32 (padding not masked); cosine logits when `margin` is given, else linear (+ bias).
    Row-sparse weight / bias (mhe_scale.optim): only these codes' rows are read (no dense gradient)."""
    codes = group_codes(groups, weight.shape[1])
    rows = gather_rows(weight, codes, unique=True, row_ndim=2)
    if margin is not None:
        return finish_logits(cosine_similarity(features, rows), margin, cols)
    b = None if bias is None else upcast(gather_rows(bias, codes, unique=True, row_ndim=2))
    return F.linear(upcast(features), upcast(rows), b)


def group_codes(groups: Tensor, group_size: int) -> Tensor:
    """Group ids [...] -> the flat row ids of their codes [..., * group_size] (group-major)."""
    members = torch.arange(group_size, device=groups.device)
    return (groups.unsqueeze(-1) * group_size + members).flatten(-2)


ROW_GROUP_CHUNK_ELEMENTS = 1 << 24
"""per_row_group_logits reads at most about this many weight elements per chunk of rows (64 MB in fp32)."""


class _RowGroupDot(torch.autograd.Function):
    """out[b, m, j] = <rows[inv[b, m], j], feats[b]> for rows [U, c_2, D], feats [B, D], inv [B, M] ->
    [B, M, c_2], forward and backward over chunks of rows: the per-row copy rows[inv] ([B, M, c_2, D],
    B * M * c_2 * D elements) never exists whole and is not kept for backward."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, feats: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(rows, feats, inv)
        out = feats.new_empty(inv.shape[0], inv.shape[1], rows.shape[1])
        for lo, hi in _row_chunks(inv, rows):
            picked = _pick(rows, inv[lo:hi]).flatten(1, 2)  # [b, M * c_2, D]
            torch.bmm(picked, feats[lo:hi].unsqueeze(2), out=out[lo:hi].view(hi - lo, -1, 1))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        rows, feats, inv = ctx.saved_tensors
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_feats = torch.empty_like(feats) if ctx.needs_input_grad[1] else None
        for lo, hi in _row_chunks(inv, rows):
            g = grad[lo:hi]
            if grad_feats is not None:
                picked = _pick(rows, inv[lo:hi]).flatten(1, 2)  # [b, M * c_2, D]
                grad_feats[lo:hi] = torch.bmm(g.reshape(hi - lo, 1, -1), picked).squeeze(1)
            if grad_rows is not None:
                outer = g.reshape(hi - lo, -1, 1) * feats[lo:hi].unsqueeze(1)  # [b, M * c_2, D]
                grad_rows.index_add_(0, inv[lo:hi].flatten(), outer.view(-1, *rows.shape[1:]))
        return grad_rows, grad_feats, None


def _pick(rows: Tensor, inv: Tensor) -> Tensor:
    """rows [U, c_2, D], inv [b, M] -> rows[inv] [b, M, c_2, D] (index_select: faster than indexing on CPU)."""
    return rows.index_select(0, inv.flatten()).view(*inv.shape, *rows.shape[1:])


def _row_chunks(inv: Tensor, rows: Tensor) -> list[tuple[int, int]]:
    """[lo, hi) ranges of batch rows whose gathered weights stay under ROW_GROUP_CHUNK_ELEMENTS."""
    per_row = max(1, inv.shape[1] * rows.shape[1] * rows.shape[2])
    step = max(1, ROW_GROUP_CHUNK_ELEMENTS // per_row)
    return [(lo, min(lo + step, inv.shape[0])) for lo in range(0, inv.shape[0], step)]


def per_row_group_logits(weight: Tensor, bias: Tensor | None, features: Tensor, groups: Tensor,
                         margin: nn.Module | None, cols: Tensor) -> Tensor:
    """Per-row groups [B, M] -> [B, M * c_2] fp32 (padding not masked). The union of the groups is read
    once ([U * c_2, D], U <= min(B * M, c_1); row-sparse: only these rows) and scored per row in chunks
    (_RowGroupDot), never as a [B, M * c_2, D] per-row copy."""
    c2 = weight.shape[1]
    union, inv = torch.unique(groups, return_inverse=True)  # [U], [B, M]
    rows = upcast(gather_rows(weight, group_codes(union, c2), unique=True, row_ndim=2)).view(-1, c2, weight.shape[2])
    feats = upcast(features)
    if margin is not None:
        rows, feats = F.normalize(rows, dim=2), F.normalize(feats, dim=1)
    logits = _RowGroupDot.apply(rows, feats, inv.reshape(groups.shape)).flatten(1)
    if margin is not None:
        return finish_logits(logits, margin, cols)
    if bias is None:
        return logits
    b = upcast(gather_rows(bias, group_codes(union, c2), unique=True, row_ndim=2)).view(-1, c2)
    return logits + b[inv.reshape(groups.shape)].flatten(1)


@register_head("mhs")
class MultiHeadSamplingHead(ClassifierHead):
    """Args:
        in_features: D.
        num_classes: C.
        multilabel: must be False (MHS is a single-label softmax head).
        sizes: (c_1, c_2) = (groups, members per group), c_1 * c_2 >= C; default factorize(C, 2).
        mode: "per_sample" or "batch_union" (see the module docstring).
        num_sampled_groups: M. per_sample: groups per row's softmax (true one included);
            batch_union: minimum number of groups in the shared softmax. Clamped to the number
            of groups holding real labels (then every softmax is the full one, reordered;
            per_sample still gathers per row, so prefer batch_union for that).
        cosine: normalise features and weights (no bias); logits = scale * cos (+ margin).
        margin: (m1, m2, m3) combined margin on the target logit; needs cosine=True.
        scale: s for cosine logits.
        margin_straight_through: see CombinedMargin.straight_through.
        bias: a bias per code (plain logits only).
    Attribute `generator` (default None = global RNG): set a torch.Generator to draw from it.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 sizes: Sequence[int] | None = None, mode: str = "per_sample", num_sampled_groups: int = 16,
                 cosine: bool = False, margin: Sequence[float] | None = None, scale: float = 64.0,
                 margin_straight_through: bool = False, bias: bool = False) -> None:
        super().__init__(in_features, num_classes, multilabel)
        if multilabel:
            raise ValueError("mhs head is single-label (softmax over sampled groups); for multi-label "
                             "use the mhc or mhp head, or set multilabel=False")
        if mode not in MHS_MODES:
            raise ValueError(f"mhs mode must be one of {MHS_MODES}, got {mode!r}")
        sizes = [int(c) for c in sizes] if sizes is not None and len(sizes) > 0 else factorize(num_classes, 2)
        if len(sizes) != 2:
            raise ValueError(f"mhs head takes exactly two sizes (groups, members per group), got sizes={sizes}; "
                             f"e.g. sizes={factorize(num_classes, 2)}")
        self.codec = LabelCodec(sizes, num_classes)  # checks c_1 * c_2 >= C and sizes >= 1
        if num_sampled_groups < 1:
            raise ValueError(f"mhs num_sampled_groups must be >= 1, got {num_sampled_groups}")
        self.sizes = sizes
        self.num_groups, self.group_size = sizes
        self.num_valid_groups = -(-num_classes // self.group_size)  # groups holding >= 1 real label
        self.mode = mode
        self.num_sampled_groups = min(int(num_sampled_groups), self.num_valid_groups)
        self.cosine = cosine
        self.margin = build_margin(cosine, margin, scale, margin_straight_through, "mhs head")
        self.weight = nn.Parameter(torch.empty(self.num_groups, self.group_size, in_features))
        self.bias = nn.Parameter(torch.zeros(self.num_groups, self.group_size)) if (bias and not cosine) else None
        self.generator: torch.Generator | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.cosine:
            nn.init.normal_(self.weight, std=0.01)
        else:  # nn.Linear's default for fan_in = D
            bound = self.in_features ** -0.5
            nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sizes={self.sizes}, mode={self.mode!r}, "
                f"num_sampled_groups={self.num_sampled_groups}, cosine={self.cosine}")

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Mark weight (rows = codes) and bias for row-sparse updates (mhe_scale.optim); return them."""
        refresh_on_state_dict(self)
        enable_row_sparse(self.weight, row_ndim=2)
        if self.bias is None:
            return [self.weight]
        enable_row_sparse(self.bias, row_ndim=2)
        return [self.weight, self.bias]

    def _finish(self, cos_or_logits: Tensor, cols: Tensor | None) -> Tensor:
        return finish_logits(cos_or_logits, self.margin if self.cosine else None, cols)

    def group_logits(self, features: Tensor, groups: Tensor, cols: Tensor | None = None) -> Tensor:
        """Shared softmax over the codes of `groups` [N] -> logits [B, N * c_2] fp32 (padding not masked)."""
        return shared_group_logits(self.weight, self.bias, features, groups, self.margin if self.cosine else None, cols)

    def row_logits(self, features: Tensor, groups: Tensor, cols: Tensor) -> Tensor:
        """Per-row groups [B, M] -> logits [B, M * c_2] fp32 (per_row_group_logits; padding not masked)."""
        return per_row_group_logits(self.weight, self.bias, features, groups, self.margin if self.cosine else None, cols)

    def sampled_logits(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training softmax -> (logits [B, N] fp32 with padding at -inf, target column [B],
        codes [B, N] (per_sample) or [N] (batch_union) naming each column)."""
        digits = self.codec.encode(targets, check=False)
        group, member = digits[:, 0], digits[:, 1]
        members = torch.arange(self.group_size, device=targets.device)
        if self.mode == "per_sample":
            groups = sample_groups_per_row(group, self.num_valid_groups, self.num_sampled_groups, self.generator)
            cols = member  # the true group is column block 0
            logits = self.row_logits(features, groups, cols)
            codes = (groups.unsqueeze(2) * self.group_size + members).flatten(1)
        else:
            groups, pos = sample_classes(group, self.num_valid_groups, self.num_sampled_groups, self.generator)
            cols = pos * self.group_size + member
            logits = self.group_logits(features, groups, cols)
            codes = (groups.unsqueeze(1) * self.group_size + members).flatten()
        logits = logits.masked_fill(codes >= self.num_classes, float("-inf"))
        return logits, cols, codes

    def full_logits(self, features: Tensor, targets: Tensor | None = None, start: int = 0,
                    stop: int | None = None) -> Tensor:
        """Full classifier on label ids [start, stop) (default all C) -> logits [B, stop - start] fp32.

        With targets [B] (global ids; only with the full range) the margin applies as in training.
        """
        stop = self.num_classes if stop is None else stop
        g0, g1 = start // self.group_size, -(-stop // self.group_size)
        rows = refresh_all(self.weight)[g0:g1].flatten(0, 1)
        lo, hi = start - g0 * self.group_size, stop - g0 * self.group_size
        if self.cosine:
            return self._finish(cosine_similarity(features, rows[lo:hi]), targets)
        bias = None if self.bias is None else upcast(refresh_all(self.bias)[g0:g1].flatten()[lo:hi])
        return F.linear(upcast(features), upcast(rows[lo:hi]), bias)

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """Sampled softmax CE in training, full softmax CE in eval; metrics["softmax_columns"] is the
        softmax width per row (padding columns included)."""
        self.check_inputs(features, targets)
        targets = targets.long()
        if self.training:
            logits, cols, _ = self.sampled_logits(features, targets)
        else:
            logits, cols = self.full_logits(features, targets), targets
        loss = F.cross_entropy(logits, cols)
        return HeadOutput(loss, {"softmax_columns": torch.tensor(float(logits.shape[1]))})

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k log-softmax scores over all C labels, scored in chunks of whole groups."""
        step = max(1, PREDICT_CHUNK_COLUMNS // self.group_size) * self.group_size
        b, dtype = features.shape[0], upcast(self.weight[:0]).dtype
        lse = features.new_full((b,), float("-inf"), dtype=dtype)
        best = features.new_empty((b, 0), dtype=dtype)
        best_ids = torch.empty((b, 0), dtype=torch.long, device=features.device)
        for start in range(0, self.num_classes, step):  # loop over label chunks, not samples
            logits = self.full_logits(features, start=start, stop=min(self.num_classes, start + step))
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
            top, ids = logits.topk(min(k, logits.shape[1]), dim=1)
            best, pick = torch.cat([best, top], 1).topk(min(k, best.shape[1] + top.shape[1]), dim=1)
            best_ids = torch.cat([best_ids, ids + start], 1).gather(1, pick)
        return pad_topk(best - lse.unsqueeze(1), best_ids, k)
