"""Collectives for class-sharded heads, as a few autograd functions that state their cost.

`group=None` means ONE process: no collective is issued and the same math runs locally (also
when torch.distributed is not initialised or the group has one rank). Pass the process group
explicitly (e.g. `torch.distributed.group.WORLD`) to shard; there is no implicit default group.
Every collective here must be called by all ranks of the group in the same order, including the
ones in backward: each rank must call backward on a loss that went through the same functions.

Gradient convention (see mhe_scale.parallel.losses and ENVIRONMENT.md): losses are global-batch
means whose gradient w.r.t. local tensors is exact; the only factor W is in the backward of
`all_gather_with_grad` (`grad_scale`), which compensates for DDP / ZeRO averaging backbone
gradients over the W data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def is_sharded(group: ProcessGroup | None) -> bool:
    """True when `group` is a real process group with more than one rank."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_group() -> ProcessGroup | None:
    """The default (WORLD) group when torch.distributed runs with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def get_world_size(group: ProcessGroup | None) -> int:
    """Number of ranks in `group`; 1 for group=None or without torch.distributed."""
    return dist.get_world_size(group) if is_sharded(group) else 1


def get_rank(group: ProcessGroup | None) -> int:
    """This process's rank in `group`; 0 for group=None or without torch.distributed."""
    return dist.get_rank(group) if is_sharded(group) else 0


def gather_sizes(n: int, group: ProcessGroup | None, device: torch.device | None = None) -> list[int]:
    """Every rank's `n` (e.g. its batch size), in rank order. Cost: one all-gather of W int64s."""
    if not is_sharded(group):
        return [int(n)]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(t) for t in torch.cat(out).tolist()]


def _gather_rows(x: Tensor, sizes: list[int], group: ProcessGroup) -> Tensor:
    """x [b_r, ...] -> [sum_r b_r, ...] given every rank's b_r; pads to max b_r when they differ."""
    top = max(sizes)
    if top == 0:
        return x.new_empty((0, *x.shape[1:]))
    x = x.contiguous()
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:b] for p, b in zip(parts, sizes)])


def _check_sizes(x: Tensor, sizes: list[int] | None, group: ProcessGroup | None) -> list[int]:
    if sizes is None:
        return gather_sizes(x.shape[0], group, x.device)
    sizes = [int(b) for b in sizes]
    rank = get_rank(group)
    if len(sizes) != get_world_size(group) or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes={sizes} must list the batch size of each of the {get_world_size(group)} ranks, and "
            f"sizes[{rank}] must equal this rank's x.shape[0]={x.shape[0]}; pass sizes=None to gather them"
        )
    return sizes


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: ProcessGroup | None, scale: float) -> Tensor:
        rank = get_rank(group)
        ctx.group, ctx.scale = group, scale
        ctx.lo = sum(sizes[:rank])
        ctx.hi = ctx.lo + sizes[rank]
        if not is_sharded(group):
            return x.view_as(x)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        if is_sharded(ctx.group):
            grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        out = grad[ctx.lo:ctx.hi]
        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None, None


def all_gather_with_grad(x: Tensor, group: ProcessGroup | None, grad_scale: float | None = None,
                         sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's rows: x [b_r, ...] -> [sum_r b_r, ...] in rank order, differentiable.

    Batch sizes may differ per rank (they are gathered first, rows padded to the largest, trimmed
    after). Backward: all-reduce SUM of the incoming gradient over ranks (every rank's loss may
    depend on every rank's rows), take this rank's rows, multiply by `grad_scale`.

    grad_scale: None means W = world size. That is right when the loss is a global-batch mean
        (as all losses in mhe_scale.parallel are) AND the backbone's gradients are then AVERAGED
        over W data-parallel ranks (DDP, DeepSpeed ZeRO, accelerate): the x W cancels the 1/W and
        the backbone update equals the single-process one. Pass 1.0 when backbone gradients are
        summed over ranks (or there is no data-parallel backbone): then x.grad is exactly
        d loss / d x. Without the factor the backbone silently moves W times too little.
    sizes: every rank's b_r if already known (e.g. from `gather_sizes`); saves one all-gather.

    Cost: forward one all-gather of W int64s (skipped if `sizes` is given) + one all-gather of
    W * max_r(b_r) rows; backward one all-reduce of sum_r(b_r) rows. Memory: the gathered rows.
    """
    sizes = _check_sizes(x, sizes, group)
    scale = float(get_world_size(group) if grad_scale is None else grad_scale)
    return _AllGatherWithGrad.apply(x, sizes, group, scale)


@torch.no_grad()
def all_gather_no_grad(x: Tensor, group: ProcessGroup | None, sizes: list[int] | None = None) -> Tensor:
    """Like `all_gather_with_grad` for tensors that need no gradient (labels, ids; any dtype).

    x [b_r, ...] -> [sum_r b_r, ...], detached. group=None returns x itself.
    Cost: one all-gather of W int64s (skipped if `sizes` is given) + one of W * max_r(b_r) rows.
    """
    sizes = _check_sizes(x, sizes, group)
    if not is_sharded(group):
        return x.detach()
    return _gather_rows(x.detach(), sizes, group)


class _AllReduceSumLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum of x over the ranks of `group` (a new tensor; x is not modified; group=None: x).

    Backward: the identity, no communication. If every rank applies the same function f to the
    sum S = sum_r x_r and calls backward, rank r receives d f(S) / d x_r exactly: this is the
    "global loss, exact local gradient" convention. (An all-reducing backward would give W * that.)
    Cost: one all-reduce of x.numel() elements forward, none backward.
    """
    if not is_sharded(group):
        return x
    return _AllReduceSumLocalGrad.apply(x, group)


@torch.no_grad()
def all_reduce_max(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Elementwise max of x over ranks, detached (a new tensor; group=None: x detached).

    No gradient (used for constants such as the row max that stabilises a softmax).
    Cost: one all-reduce of x.numel() elements.
    """
    if not is_sharded(group):
        return x.detach()
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out
