"""What every class-sharded head shares: deterministic shard init, batch gathering, ragged softmax.

A sharded head splits its O(C) parameter (fc / Partial FC classes, MHS groups, MHC labels) over
the ranks of `group` with a `ShardPlan`; each rank allocates only its own rows. Conventions (the
ones of mhe_scale.parallel.losses, which these heads build on):
  * forward(local_features [b_r, D], local_targets) -> HeadOutput whose loss is the GLOBAL mean
    over every rank's rows, the same on every rank; every rank must call forward and backward;
  * head parameters get the exact gradient of that loss (never average them over ranks: a sharded
    head is not wrapped by DDP / DeepSpeed);
  * features are all-gathered with `all_gather_with_grad(grad_scale)`: grad_scale=None (W) suits a
    backbone whose gradients DDP / ZeRO average; 1.0 gives exactly d loss / d features;
  * predict(local_features, k) -> this rank's rows' (scores [b_r, k], global ids [b_r, k]); it is
    collective too (every rank scores the whole gathered batch against its shard).

Initialisation that does not depend on W (`init_rows_`): the virtual full [N, ...] tensor is cut
into blocks of INIT_BLOCK_ROWS global rows; block b is drawn from a CPU generator seeded with
`block_seed(init_seed, b)`, and a shard copies the rows of the blocks it overlaps. The union of the
shards is therefore the same tensor for every world size (and for group=None), though not the
one a single-process head draws from torch's global RNG; to start from a single-process head's
weights, use `load_single_process_state_`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from mhe_scale.heads.base import ClassifierHead
from mhe_scale.parallel.collectives import (all_gather_no_grad, all_gather_with_grad, all_reduce_max, all_reduce_sum,
                                            gather_sizes, get_rank, get_world_size)
from mhe_scale.parallel.losses import sharded_cross_entropy
from mhe_scale.parallel.shard import ShardPlan

INIT_BLOCK_ROWS = 4096
"""Rows per independently seeded init block (changing it changes every sharded head's init)."""

Fill = Callable[[Tensor, torch.Generator], None]


def block_seed(seed: int, block: int) -> int:
    """Seed of init block `block` (or of a per-rank sampler) derived from `seed`; deterministic."""
    return (int(seed) * 1_000_003 + int(block) * 7_919 + 1) % (1 << 63)


def name_seed(seed: int, name: str) -> int:
    """Seed for a named (replicated) tensor: the same on every rank and every run."""
    return block_seed(seed, zlib.crc32(name.encode()))


@torch.no_grad()
def init_rows_(shard: Tensor, start: int, seed: int, fill: Fill, block_rows: int = INIT_BLOCK_ROWS) -> Tensor:
    """Fill shard [n, ...] in place with global rows [start, start + n) of the W-independent init.

    `fill(block, generator)` draws one block [block_rows, ...] (e.g. `uniform_`, `normal_` with
    generator=); it runs on CPU, the result is copied to shard's device and dtype. Init-time loop
    over ceil(n / block_rows) + 1 blocks at most.
    """
    n = shard.shape[0]
    for b in range(start // block_rows, -(-(start + n) // block_rows)):
        g = torch.Generator().manual_seed(block_seed(seed, b))
        block = torch.empty((block_rows, *shard.shape[1:]), dtype=torch.float64 if shard.dtype == torch.float64
                            else torch.float32)
        fill(block, g)
        lo, hi = max(start, b * block_rows), min(start + n, (b + 1) * block_rows)
        shard[lo - start:hi - start].copy_(block[lo - b * block_rows:hi - b * block_rows])
    return shard


def uniform_fill(bound: float) -> Fill:
    """U(-bound, bound), e.g. bound = D ** -0.5 as nn.Linear's default weight init."""
    def fill(t: Tensor, g: torch.Generator) -> None:
        t.uniform_(-bound, bound, generator=g)
    return fill


def normal_fill(std: float) -> Fill:
    """N(0, std^2)."""
    def fill(t: Tensor, g: torch.Generator) -> None:
        t.normal_(0.0, std, generator=g)
    return fill


def row_slice(sizes: list[int], rank: int) -> slice:
    """This rank's rows in a batch gathered in rank order from per-rank sizes."""
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def gather_batch(features: Tensor, targets: Tensor, group: ProcessGroup | None,
                 grad_scale: float | None) -> tuple[Tensor, Tensor, list[int]]:
    """(features [b_r, D], targets [b_r] or [b_r, L_r]) -> global batch (features [B, D] with grad,
    targets [B] or [B, max L] padded with -1, every rank's b_r). Multi-label rows of different
    widths cost one extra all-reduce (MAX of L_r)."""
    sizes = gather_sizes(features.shape[0], group, features.device)
    gathered = all_gather_with_grad(features, group, grad_scale, sizes)
    targets = targets.long()
    if targets.dim() == 2:
        width = int(all_reduce_max(torch.tensor([targets.shape[1]], device=targets.device), group)[0])
        if targets.shape[1] < width:
            pad = targets.new_full((targets.shape[0], width - targets.shape[1]), -1)
            targets = torch.cat([targets, pad], dim=1)
    return gathered, all_gather_no_grad(targets, group, sizes), sizes


def owner_of(ids: Tensor, plan: ShardPlan) -> Tensor:
    """ids [...] in [0, plan.num_items) -> LongTensor [...] rank owning each (no communication)."""
    starts = torch.tensor([s for s, _ in plan.all_ranges()[1:]], dtype=torch.long, device=ids.device)
    return torch.bucketize(ids.long(), starts, right=True)


def distinct_per_rank(ids: Tensor, plan: ShardPlan) -> Tensor:
    """Number of distinct valid ids [N] (in [0, num_items)) each rank owns -> LongTensor [W]."""
    ids = ids[(ids >= 0) & (ids < plan.num_items)].unique()
    return torch.bincount(owner_of(ids, plan), minlength=plan.world)


def ragged_cross_entropy(local_logits: Tensor, local_cols: Tensor, width: int, group: ProcessGroup | None,
                         labels: Tensor | None = None) -> Tensor:
    """Softmax CE (mean over rows with a target) when ranks hold DIFFERENT numbers of columns.

    local_logits [B, n_r], n_r <= width; width: the same on every rank, >= every rank's n_r.
    local_cols [B]: the row's target column on this rank, -1 where another rank holds it.
    Rank r's columns become the ids [r * width, r * width + n_r) of a padded class space (padding
    columns are -inf, so they take no probability) and `sharded_cross_entropy` runs on it.
    labels: those padded ids [B], identical on every rank, if the caller knows them; otherwise
    they are found with one all-reduce SUM of B int64 (a row no rank claims is ignored).
    Cost: that all-reduce + sharded_cross_entropy's two; backward local.
    """
    world, rank = get_world_size(group), get_rank(group)
    width = max(int(width), 1)  # an empty global batch still gets a (nan) loss, as F.cross_entropy
    plan = ShardPlan.for_rank(world * width, rank, world)
    missing = width - local_logits.shape[1]
    if missing < 0:
        raise ValueError(f"ragged_cross_entropy: this rank holds {local_logits.shape[1]} columns > width={width}")
    if missing:
        local_logits = torch.cat([local_logits, local_logits.new_full((local_logits.shape[0], missing),
                                                                      float("-inf"))], dim=1)
    if labels is None:
        mine = torch.where(local_cols >= 0, local_cols.long() + plan.start + 1, 0)
        labels = all_reduce_sum(mine, group) - 1
    return sharded_cross_entropy(local_logits, labels, plan, group)


def global_logsumexp(local_logits: Tensor, group: ProcessGroup | None) -> Tensor:
    """logsumexp over every rank's columns: local_logits [B, n_r] -> [B] (no grad). Two all-reduces."""
    if local_logits.shape[1]:
        return global_logaddexp(local_logits.logsumexp(dim=1), group)
    return global_logaddexp(local_logits.new_full((local_logits.shape[0],), float("-inf")), group)


def global_logaddexp(local_lse: Tensor, group: ProcessGroup | None) -> Tensor:
    """Per-rank logsumexps [B] -> the logsumexp over all ranks [B] (no grad). Two all-reduces."""
    top = all_reduce_max(local_lse, group)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return safe + all_reduce_sum((local_lse.detach() - safe).exp(), group).log()


@torch.no_grad()
def merge_topk(scores: Tensor, ids: Tensor, k: int, group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Every rank's candidates (scores [B, k], global ids [B, k]) -> global top-k, same on all ranks.

    Entries with score -inf come back with id -1 (as ClassifierHead.predict pads).
    Cost: two all-gathers of B * k values (as `sharded_topk`).
    """
    world = get_world_size(group)
    rows = scores.shape[0]
    if world > 1:
        one = [1] * world
        scores = all_gather_no_grad(scores.unsqueeze(0), group, one).permute(1, 0, 2).reshape(rows, world * k)
        ids = all_gather_no_grad(ids.unsqueeze(0), group, one).permute(1, 0, 2).reshape(rows, world * k)
    top, pos = scores.topk(k, dim=1)
    ids = ids.gather(1, pos)
    return top, torch.where(top == float("-inf"), torch.full_like(ids, -1), ids)


class ShardedMixin:
    """Bookkeeping every sharded head offers (on top of nn.Module): which parameters are sharded
    along dim 0 by `plan`, their names in the single-process head, and loading from one."""

    plan: ShardPlan
    group: ProcessGroup | None
    sharded_parameters: tuple[str, ...]

    def gather_features(self, features: Tensor) -> tuple[Tensor, slice]:
        """Predict-time gather without grad: (features [B, D], this rank's rows of the result)."""
        if features.dim() != 2 or features.shape[1] != self.in_features:  # type: ignore[attr-defined]
            raise ValueError(f"{type(self).__name__} expects features [B, {self.in_features}], "
                             f"got {tuple(features.shape)}")
        sizes = gather_sizes(features.shape[0], self.group, features.device)
        return all_gather_no_grad(features, self.group, sizes), row_slice(sizes, self.plan.rank)

    def single_process_names(self) -> dict[str, str]:
        """This head's state_dict name -> the name of the same tensor in the single-process head."""
        return {name: name for name in self.state_dict()}  # type: ignore[attr-defined]

    @torch.no_grad()
    def load_single_process_state_(self, state: Mapping[str, Tensor]) -> None:
        """Copy this rank's rows (sharded tensors) and the replicated tensors from a single-process
        head's state_dict (e.g. `FullyConnectedHead(...).state_dict()`; a pretrained head)."""
        names = self.single_process_names()
        own = self.state_dict()  # type: ignore[attr-defined]
        missing = sorted(names[n] for n in own if names[n] not in state)
        if missing:
            raise KeyError(f"{type(self).__name__}: the single-process state lacks {missing}")
        for name, target in own.items():
            full = state[names[name]]
            part = full[self.plan.local_slice()] if name in self.sharded_parameters else full
            if part.shape != target.shape:
                raise ValueError(f"{type(self).__name__}: {names[name]} has shape {tuple(full.shape)}; this rank "
                                 f"needs {tuple(target.shape)} (rows {self.plan.start}:{self.plan.end} of dim 0 "
                                 f"when sharded); was the single-process head built with the same arguments?")
            target.copy_(part)


class ShardedHead(ShardedMixin, ClassifierHead):
    """ClassifierHead whose O(C) parameter is sharded over `group` along `num_items` (see module doc)."""

    sharded_parameters: tuple[str, ...] = ("weight",)

    def __init__(self, in_features: int, num_classes: int, multilabel: bool, num_items: int,
                 group: ProcessGroup | None, grad_scale: float | None, init_seed: int) -> None:
        super().__init__(in_features, num_classes, multilabel)
        self.group = group
        self.plan = ShardPlan.from_group(num_items, group)
        self.grad_scale = grad_scale
        self.init_seed = int(init_seed)

    def gather(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Checks this rank's inputs, then `gather_batch` (collective)."""
        self.check_inputs(features, targets)
        return gather_batch(features, targets, self.group, self.grad_scale)

    def extra_repr(self) -> str:
        p = self.plan
        return (f"{super().extra_repr()}, shard=[{p.start}, {p.end}) of {p.num_items} on rank {p.rank}/{p.world}")


def param(shape: tuple[int, ...]) -> nn.Parameter:
    """An uninitialised fp32 parameter (filled by the head's reset_parameters)."""
    return nn.Parameter(torch.empty(shape))


def kept_widths(counts: Tensor, wants: Sequence[int], limits: Sequence[int], batch: int) -> tuple[int, int]:
    """(largest, total) of the per-rank kept counts [W] = min(max(positives, wants), limits).

    When every rank wants at least `batch` entries (a rank's positives are at most the global batch),
    the counts are min(wants, limits), known on the host: no device sync on the hot path. Otherwise
    they are read from `counts` (one sync)."""
    if len(wants) and min(wants) >= batch:
        host = [min(int(w), int(c)) for w, c in zip(wants, limits)]
        return max(host), sum(host)
    return int(counts.max()), int(counts.sum())
