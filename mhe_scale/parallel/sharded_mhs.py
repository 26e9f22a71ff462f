"""Group-sharded Multi-Head Sampling head: rank r holds the weight [G_r, c_2, D] of groups [start, end).

The codes of MultiHeadSamplingHead (label y = group y // c_2, member y % c_2) are sharded by whole
groups, so a group's softmax columns live on one rank. Every rank sees the GLOBAL batch (features
all-gathered with grad, labels without) and scores only groups it owns:
  "batch_union"  rank r keeps the groups of its range present in the batch (the owner always keeps
                 them) plus uniform groups of its own range, m_r = ceil(M * V_r / V) in total
                 (V_r: groups of r holding real labels, V = sum V_r); the shared softmax is the
                 union of the ranks' kept groups (per-rank draws: seed block_seed(sample_seed, r)).
  "per_sample"   every rank draws each row's M groups with `sample_groups_per_row` from a
                 generator in the SAME state on every rank (seed sample_seed), so all ranks agree on
                 the groups; rank r scores the sampled groups it owns (compacted: owned groups first,
                 width = the most any row has on r), the rest are -inf, and the sharded CE runs over
                 each row's M * c_2 columns. The true group is owned by one rank, whose column block
                 0 after compaction it is, so every rank knows each row's padded target id: no
                 extra collective.
Eval-mode forward and predict are the full classifier over all C labels (predict: chunked local
scoring, global log-sum-exp by two all-reduces, candidates merged like `sharded_topk`).
Padding codes (>= C) are -inf everywhere; a rank may own only padding groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from mhe_scale.heads.base import HeadOutput, pad_topk, upcast
from mhe_scale.heads.linear import build_margin
from mhe_scale.optim.rows import enable_row_sparse, refresh_on_state_dict
from mhe_scale.heads.mhs import (MHS_MODES, PREDICT_CHUNK_COLUMNS, per_row_group_logits, sample_groups_per_row,
                                  shared_group_logits)
from mhe_scale.heads.partial_fc import sample_classes
from mhe_scale.labels.codec import LabelCodec, factorize
from mhe_scale.parallel.sharded_heads import (ShardedHead, block_seed, distinct_per_rank, global_logaddexp, init_rows_,
                                              kept_widths, merge_topk, normal_fill, owner_of, param, ragged_cross_entropy,
                                              uniform_fill)

NEG_INF = float("-inf")


class ShardedMultiHeadSamplingHead(ShardedHead):
    """MultiHeadSamplingHead with its weight [c_1, c_2, D] (and bias) sharded by group over `group`.

    Args (as MultiHeadSamplingHead unless noted):
        in_features, num_classes, multilabel (must be False), sizes, mode, num_sampled_groups,
        cosine, margin, scale, margin_straight_through, bias.
        group: process group the c_1 groups are sharded over (None = one process).
        grad_scale, init_seed: see ShardedFullyConnectedHead (init: the code rows [c_1 * c_2, D]
            in W-independent blocks, U(+-D^-1/2) or N(0, 0.01^2) when cosine).
        sample_seed: see the module doc; or set the attribute `generator` (per_sample: it must be
            in the same state on every rank).
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 sizes: Sequence[int] | None = None, mode: str = "per_sample", num_sampled_groups: int = 16,
                 cosine: bool = False, margin: Sequence[float] | None = None, scale: float = 64.0,
                 margin_straight_through: bool = False, bias: bool = False, group: ProcessGroup | None = None,
                 grad_scale: float | None = None, init_seed: int = 0, sample_seed: int = 0) -> None:
        sizes = [int(c) for c in sizes] if sizes is not None and len(sizes) > 0 else factorize(num_classes, 2)
        if len(sizes) != 2:
            raise ValueError(f"sharded mhs head takes exactly two sizes (groups, members per group), got "
                             f"sizes={sizes}; e.g. sizes={factorize(num_classes, 2)}")
        super().__init__(in_features, num_classes, multilabel, sizes[0], group, grad_scale, init_seed)
        if multilabel:
            raise ValueError("sharded mhs head is single-label (softmax over sampled groups); set multilabel=False")
        if mode not in MHS_MODES:
            raise ValueError(f"mhs mode must be one of {MHS_MODES}, got {mode!r}")
        if num_sampled_groups < 1:
            raise ValueError(f"mhs num_sampled_groups must be >= 1, got {num_sampled_groups}")
        self.codec = LabelCodec(sizes, num_classes)
        self.sizes = sizes
        self.num_groups, self.group_size = sizes
        self.num_valid_groups = -(-num_classes // self.group_size)
        self.mode = mode
        self.num_sampled_groups = min(int(num_sampled_groups), self.num_valid_groups)
        ranges = self.plan.all_ranges()
        self.valid_counts = [max(0, min(c, self.num_valid_groups - s)) for s, c in ranges]  # V_r
        self.sample_counts = [min(v, math.ceil(self.num_sampled_groups * v / self.num_valid_groups))
                              for v in self.valid_counts]
        self.cosine = cosine
        self.margin = build_margin(cosine, margin, scale, margin_straight_through, "sharded mhs head")
        self.sample_seed = int(sample_seed)
        self.generator: torch.Generator | None = None
        self.weight = param((self.plan.count, self.group_size, in_features))
        self.bias = param((self.plan.count, self.group_size)) if (bias and not cosine) else None
        self.sharded_parameters = ("weight",) if self.bias is None else ("weight", "bias")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fill = normal_fill(0.01) if self.cosine else uniform_fill(self.in_features ** -0.5)
        init_rows_(self.weight.view(-1, self.in_features), self.plan.start * self.group_size, self.init_seed, fill)
        if self.bias is not None:
            self.bias.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, sizes={self.sizes}, mode={self.mode!r}, "
                f"num_sampled_groups={self.num_sampled_groups}, cosine={self.cosine}")

    def row_sparse_parameters(self) -> list[torch.nn.Parameter]:
        """Mark the shard's weight (rows = codes) and bias for row-sparse updates (mhe_scale.optim)."""
        refresh_on_state_dict(self)
        params = [self.weight] if self.bias is None else [self.weight, self.bias]
        for p in params:
            enable_row_sparse(p, row_ndim=2)
        return params

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            seed = self.sample_seed if self.mode == "per_sample" else block_seed(self.sample_seed, self.plan.rank)
            self.generator = torch.Generator(device).manual_seed(seed)
        return self.generator

    # ------------------------------------------------------------------ scoring pieces (local groups)
    def _codes(self, local_groups: Tensor) -> Tensor:
        """Local group indices [...] -> global codes [..., c_2] flattened into the last dim."""
        members = torch.arange(self.group_size, device=local_groups.device)
        return ((local_groups + self.plan.start).unsqueeze(-1) * self.group_size + members).flatten(-2)

    def shared_logits(self, features: Tensor, local_groups: Tensor, cols: Tensor | None = None) -> Tensor:
        """One softmax for all rows over local groups [N] -> [B, N * c_2] fp32, padding codes -inf."""
        logits = shared_group_logits(self.weight, self.bias, features, local_groups,
                                     self.margin if self.cosine else None, cols)
        return logits.masked_fill(self._codes(local_groups) >= self.num_classes, NEG_INF)

    def row_logits(self, features: Tensor, local_groups: Tensor, cols: Tensor) -> Tensor:
        """Per-row local groups [B, m] -> [B, m * c_2] fp32 (per_row_group_logits), padding codes -inf."""
        logits = per_row_group_logits(self.weight, self.bias, features, local_groups,
                                      self.margin if self.cosine else None, cols)
        return logits.masked_fill(self._codes(local_groups) >= self.num_classes, NEG_INF)

    # ------------------------------------------------------------------ the three softmaxes
    def _per_sample(self, features: Tensor, group: Tensor, member: Tensor) -> tuple[Tensor, int]:
        plan, c2 = self.plan, self.group_size
        groups = sample_groups_per_row(group, self.num_valid_groups, self.num_sampled_groups,
                                       self._generator(group.device))       # [B, M], same on every rank
        owner = owner_of(groups, plan)
        per_rank = (F.one_hot(owner, plan.world).sum(dim=1).amax(dim=0) if groups.shape[0]
                    else owner.new_zeros(plan.world))                        # most groups a row has on each rank
        width, mine = int(per_rank.max()), int(per_rank[plan.rank])
        owned = owner == plan.rank
        order = (~owned).to(torch.int8).argsort(dim=1, stable=True)[:, :mine]  # owned groups first
        local = (groups.gather(1, order) - plan.start).clamp(0, plan.count - 1)
        true_owner = owner[:, 0]                                              # column 0 = the true group
        cols = torch.where(true_owner == plan.rank, member, -1)
        logits = self.row_logits(features, local, cols)
        logits = logits.masked_fill(~owned.gather(1, order).repeat_interleave(c2, dim=1), NEG_INF)
        labels = true_owner * (width * c2) + member
        return ragged_cross_entropy(logits, cols, width * c2, self.group, labels), self.num_sampled_groups * c2

    def _sample_groups(self, group: Tensor) -> tuple[Tensor, Tensor]:
        """batch_union draw: global groups [B] -> (kept local groups [n_r], position in them [B] or -1)."""
        valid = self.valid_counts[self.plan.rank]
        if valid == 0:  # this rank owns only padding groups
            return group.new_empty(0), torch.full_like(group, -1)
        return sample_classes(group - self.plan.start, valid, self.sample_counts[self.plan.rank],
                              self._generator(group.device))

    def kept_groups(self, labels: Tensor) -> Tensor:
        """batch_union: global group ids this rank keeps for global labels [B] (draws from `generator`)."""
        group = self.codec.encode(labels.long(), check=False)[:, 0]
        return self._sample_groups(group)[0] + self.plan.start

    def _batch_union(self, features: Tensor, group: Tensor, member: Tensor) -> tuple[Tensor, int]:
        plan, c2 = self.plan, self.group_size
        kept, pos = self._sample_groups(group)
        cols = torch.where(pos >= 0, pos * c2 + member, -1)
        positives = distinct_per_rank(group, plan)
        counts = torch.minimum(torch.maximum(positives, positives.new_tensor(self.sample_counts)),
                               positives.new_tensor(self.valid_counts))
        logits = self.shared_logits(features, kept, cols)
        width, total = kept_widths(counts, self.sample_counts, self.valid_counts, group.numel())
        return ragged_cross_entropy(logits, cols, width * c2, self.group), total * c2

    def _full(self, features: Tensor, labels: Tensor) -> Tensor:
        plan, c2 = self.plan, self.group_size
        starts = torch.tensor([s for s, _ in plan.all_ranges()], device=labels.device)
        owner = owner_of(torch.div(labels, c2, rounding_mode="floor"), plan)
        offset = labels - starts[owner] * c2                       # column in the owner's codes
        cols = torch.where(owner == plan.rank, offset, -1)
        logits = self.shared_logits(features, torch.arange(plan.count, device=labels.device), cols)
        width = plan.all_ranges()[0][1] * c2                       # rank 0 holds the most groups
        return ragged_cross_entropy(logits, cols, width, self.group, owner * width + offset)

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """features [b_r, D], labels [b_r] -> global mean CE of the sampled (training) or full (eval)
        softmax; metrics["softmax_columns"]: softmax width per row (padding included)."""
        features, labels, _ = self.gather(features, targets)
        if not self.training:
            loss, width = self._full(features, labels), self.num_classes
        else:
            digits = self.codec.encode(labels, check=False)
            step = self._per_sample if self.mode == "per_sample" else self._batch_union
            loss, width = step(features, digits[:, 0], digits[:, 1])
        return HeadOutput(loss, {"softmax_columns": torch.tensor(float(width))})

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's rows: top-k log-softmax scores over all C labels (local groups in chunks)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got k={k}")
        gathered, mine = self.gather_features(features)
        b, dtype = gathered.shape[0], upcast(self.weight[:0]).dtype
        step = max(1, PREDICT_CHUNK_COLUMNS // self.group_size)
        lse = gathered.new_full((b,), NEG_INF, dtype=dtype)
        best = gathered.new_empty((b, 0), dtype=dtype)
        best_ids = torch.empty((b, 0), dtype=torch.long, device=gathered.device)
        for g0 in range(0, self.plan.count, step):  # loop over chunks of groups, not samples
            chunk = torch.arange(g0, min(self.plan.count, g0 + step), device=gathered.device)
            logits = self.shared_logits(gathered, chunk)
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
            top, pos = logits.topk(min(k, logits.shape[1]), dim=1)
            best, pick = torch.cat([best, top], 1).topk(min(k, best.shape[1] + top.shape[1]), dim=1)
            best_ids = torch.cat([best_ids, self._codes(chunk)[pos]], 1).gather(1, pick)
        best, best_ids = pad_topk(best - global_logaddexp(lse, self.group).unsqueeze(1), best_ids, k)
        # sharded_topk would need all [B, C_r] scores at once; merging per-rank candidates is the same
        # final step while the chunks keep memory at O(B * PREDICT_CHUNK_COLUMNS)
        top, ids = merge_topk(best, best_ids, k, self.group)
        return top[mine], ids[mine]
