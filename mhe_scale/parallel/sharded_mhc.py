"""Label-sharded Multi-Head Cascade: the last level's label table (and bias) split by label range.

MultiHeadCascadeHead scores, at its last level, the children of the kept prefixes through a
label embedding table E [C, hidden] (+ a bias [C]): the only O(C) parameter. Here
`ShardedCascadeLabelTable` holds rank r's rows of E; for candidate codes [B, M] (the same on
every rank) each rank scores the candidates it owns (compacted: owned codes first, width = the
most any row has on r, so the gather is ~B * M / W rows, not B * M) and an all-reduce SUM gives
every rank the full candidate logits [B, M].

Everything else stays REPLICATED: the group layer, the projections, the tables of levels before
the last (they are O(C / c_last)). `ShardedMultiHeadCascadeHead` all-gathers the batch and runs
the single-process cascade (candidate selection, losses, beam search) on the GLOBAL batch on every
rank, identically, swapping in the sharded table for the last level. Choice for the replicated
parameters: each rank computes them on the global batch and receives their FULL, exact gradient
(the table's query input all-reduces its gradient in backward), identical on every rank; so they
are NOT averaged and not wrapped by DDP: step them with the head's optimizer on every rank and
they stay equal (they start equal: init from `init_seed`, not from torch's global RNG). The cost
is computing them W times (B * D * n_0 for the group layer: small next to the backbone).
Because the gradient reaching the gathered features is then the full one on every rank, the
features are gathered with grad_scale / W, so the backbone convention of the other heads holds
(grad_scale=None: rank r's features get W x d loss / d features, for DDP / ZeRO averaging).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from mhe_scale.heads.base import HeadOutput
from mhe_scale.heads.mhc import MultiHeadCascadeHead
from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_on_state_dict
from mhe_scale.parallel.collectives import all_reduce_sum, get_world_size, is_sharded
from mhe_scale.parallel.shard import ShardPlan
from mhe_scale.parallel.sharded_heads import (ShardedMixin, gather_batch, init_rows_, name_seed, normal_fill, param,
                                              uniform_fill)


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def replicated_input(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Identity forward; backward all-reduce SUM. For a tensor that is the same on every rank and
    feeds rank-local PARTIAL results (summed later by `all_reduce_sum`, whose backward is the
    identity): its gradient is then the full one on every rank. Cost: one all-reduce of x in backward."""
    return _ReplicatedInput.apply(x, group) if is_sharded(group) else x


class ShardedCascadeLabelTable(ShardedMixin, nn.Module):
    """Label embedding table [num_labels, hidden] (+ bias [num_labels]) sharded by label range.

    Args:
        num_labels: C.
        hidden: embedding width.
        bias: a learned bias per label.
        group: process group (None = one process).
        init_seed: W-independent block init (sharded_heads.init_rows_), N(0, std^2); bias zeros.
        std: init std; default hidden ** -0.5 (MultiHeadCascadeHead's).
    """

    def __init__(self, num_labels: int, hidden: int, bias: bool = True, group: ProcessGroup | None = None,
                 init_seed: int = 0, std: float | None = None) -> None:
        super().__init__()
        self.group = group
        self.plan = ShardPlan.from_group(num_labels, group)
        self.sharded_parameters = ("weight", "bias") if bias else ("weight",)
        self.hidden, self.init_seed = int(hidden), int(init_seed)
        self.std = float(std) if std is not None else self.hidden ** -0.5
        self.weight = param((self.plan.count, self.hidden))
        self.bias = param((self.plan.count,)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_rows_(self.weight, self.plan.start, self.init_seed, normal_fill(self.std))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, query: Tensor, codes: Tensor) -> Tensor:
        """query [B, hidden] and codes [B, M] (same on every rank) -> logits [B, M] (same on every
        rank; 0 at codes outside [0, C): mask them). Collective: every rank must call it.
        Cost: one all-reduce of B * M values forward, one of B * hidden backward."""
        plan = self.plan
        query = replicated_input(query, self.group)
        owned = plan.owns(codes)
        width = int(owned.sum(dim=1).max()) if codes.numel() else 0
        order = (~owned).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
        local = (codes.gather(1, order) - plan.start).clamp(0, plan.count - 1)
        part = torch.bmm(gather_rows(self.weight, local).to(query.dtype), query.unsqueeze(2)).squeeze(2)
        if self.bias is not None:
            part = part + gather_rows(self.bias, local).to(query.dtype)
        part = part.masked_fill(~owned.gather(1, order), 0.0)
        return all_reduce_sum(part.new_zeros(codes.shape).scatter(1, order, part), self.group)

    def extra_repr(self) -> str:
        p = self.plan
        return f"rows [{p.start}, {p.end}) of {p.num_items}, hidden={self.hidden}, bias={self.bias is not None}"


class ShardedMultiHeadCascadeHead(ShardedMixin, MultiHeadCascadeHead):
    """MultiHeadCascadeHead (any H >= 2, multi-label BCE or single-label CE) whose last-level label
    table is a `ShardedCascadeLabelTable`; the rest is replicated (see the module doc).

    Args: as MultiHeadCascadeHead, plus
        group: process group the labels are sharded over (None = one process).
        grad_scale: see ShardedFullyConnectedHead (None = W, for a DDP/ZeRO-averaged backbone).
        init_seed: every parameter is drawn from generators seeded by (init_seed, its name / its
            row block), never from torch's global RNG, so replicated ones start equal on all ranks;
            distributions as MultiHeadCascadeHead (Linear: U(+-D^-1/2), tables N(0, 1/hidden)).
    forward(features [b_r, D], targets) -> global loss; predict(features [b_r, D], k) -> this rank's
    rows (beam search on the global batch). The last level's bias is `table.bias`.
    """

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False,
                 sizes: Sequence[int] | None = None, num_heads: int = 2, num_groups: int | None = None,
                 top_k_groups: int = 10, hidden: int = 300, beam: int | None = None, label_bias: bool = True,
                 level_weights: Sequence[float] | None = None, group: ProcessGroup | None = None,
                 grad_scale: float | None = None, init_seed: int = 0) -> None:
        with torch.device("meta"):  # the single-process head would allocate the full [C, hidden] table
            super().__init__(in_features, num_classes, multilabel, sizes, num_heads, num_groups, top_k_groups,
                             hidden, beam, label_bias, level_weights)
        self.embed = nn.ModuleList(list(self.embed)[:-1])  # the last level lives in self.table
        if self.prefix_bias is not None:
            self.prefix_bias = nn.ParameterList(list(self.prefix_bias)[:-1])
        self.to_empty(device="cpu")
        self.group, self.grad_scale, self.init_seed = group, grad_scale, int(init_seed)
        self.table = ShardedCascadeLabelTable(num_classes, self.hidden, label_bias, group,
                                              name_seed(init_seed, "table"))
        self.plan = self.table.plan
        self.sharded_parameters = tuple(f"table.{n}" for n in self.table.sharded_parameters)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if "table" not in self._modules:  # called by MultiHeadCascadeHead.__init__ on meta tensors
            return
        for name, p in self.named_parameters():
            if name.startswith("table."):
                continue
            if name.startswith("prefix_bias."):
                p.zero_()
                continue
            if name.startswith("embed."):
                fill = normal_fill(self.hidden ** -0.5)
            else:  # nn.Linear's default: U(+-1/sqrt(fan_in)) for weight and bias
                fill = uniform_fill(self.in_features ** -0.5)
            init_rows_(p, 0, name_seed(self.init_seed, name), fill)
        self.table.reset_parameters()

    def row_sparse_parameters(self) -> list[nn.Parameter]:
        """Mark the sharded label table for row-sparse updates (mhe_scale.optim); the replicated
        parameters keep dense updates."""
        refresh_on_state_dict(self.table)
        params = [self.table.weight] + ([] if self.table.bias is None else [self.table.bias])
        for p in params:
            enable_row_sparse(p)
        return params

    def single_process_names(self) -> dict[str, str]:
        last = len(self.sizes) - 2  # index of the last level in MultiHeadCascadeHead's embed / prefix_bias
        names = {name: name for name in self.state_dict()}
        names["table.weight"] = f"embed.{last}.weight"
        if "table.bias" in names:
            names["table.bias"] = f"prefix_bias.{last}"
        return names

    def prefix_logits(self, level: int, query: Tensor, codes: Tensor) -> Tensor:
        if level == len(self.sizes) - 1:
            return self.table(query, codes)
        return super().prefix_logits(level, query, codes)

    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """features [b_r, D], targets [b_r] / [b_r, L] -> the single-process loss of the global batch."""
        self.check_inputs(features, targets)
        world = get_world_size(self.group)
        scale = float(world if self.grad_scale is None else self.grad_scale) / world
        gathered, targets, _ = gather_batch(features, targets, self.group, scale)
        return super().forward(gathered, targets)

    @torch.no_grad()
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """This rank's rows of the beam search run on the global batch."""
        gathered, mine = self.gather_features(features)
        top, ids = super().predict(gathered, k)
        return top[mine], ids[mine]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={'None' if self.group is None else get_world_size(self.group)}"
