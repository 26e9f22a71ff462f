"""Losses and top-k over class-sharded logits: each rank holds the columns of its own classes.

Layout: rank r owns the global classes [plan.start, plan.end) (see `ShardPlan`) and holds
local_logits [B, C_r] for the WHOLE (all-gathered) batch of B rows; labels [B] are the same global
labels on every rank. No rank ever materialises [B, C].

Convention (the one every function here follows):
  * the loss returned on every rank is the same GLOBAL mean loss (what one process would compute
    on the full logits);
  * its gradient w.r.t. local_logits is the exact gradient of that global loss w.r.t. those
    columns: no factor W, and no collective in backward;
  * the only factor W lives in `all_gather_with_grad`'s backward (see collectives.py), which
    compensates for DDP / ZeRO averaging the backbone's gradients.
Every rank must call backward on the returned loss (with the same upstream gradient, e.g. 1).
group=None runs the same math in one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from torch.autograd.function import once_differentiable

from mhe_scale.parallel.collectives import all_gather_no_grad, all_reduce_max, all_reduce_sum, get_rank, get_world_size
from mhe_scale.parallel.shard import ShardPlan


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Half precision logits are reduced in fp32; fp32 / fp64 stay as they are."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_logits(local_logits: Tensor, rows: int, count: int, what: str) -> None:
    if local_logits.dim() != 2 or local_logits.shape != (rows, count):
        raise ValueError(
            f"{what}: local_logits must be [B, C_r] = [{rows}, {count}] (global batch x this rank's "
            f"classes), got {tuple(local_logits.shape)}"
        )


def _check_plan(plan: ShardPlan, group: ProcessGroup | None, what: str) -> None:
    """The plan must describe this process in `group` (a mismatch gives silently wrong ranges)."""
    world, rank = get_world_size(group), get_rank(group)
    if (plan.world, plan.rank) != (world, rank):
        raise ValueError(
            f"{what}: plan is for rank {plan.rank} of {plan.world} but this process is rank {rank} of "
            f"{world} in the given group; build it with ShardPlan.from_group(num_items, group)"
        )


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, plan: ShardPlan, group: ProcessGroup | None) -> Tensor:
        x = logits.to(_compute_dtype(logits))
        local = plan.to_local(labels)                                    # [B], -1: not ours / ignored
        owned = local >= 0
        valid = labels >= 0
        row_max = all_reduce_max(x.max(dim=1).values, group)            # all-reduce 1: [B] MAX
        probs = (x - row_max.unsqueeze(1)).exp_()                        # [B, C_r]
        target = x.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)
        target = torch.where(owned, target, torch.zeros_like(target))  # only the owner contributes
        sums = all_reduce_sum(torch.stack([probs.sum(dim=1), target]), group)  # all-reduce 2: [2, B] SUM
        sum_exp, target = sums[0], sums[1]
        per_row = sum_exp.log() + row_max - target                       # -log softmax[label]
        count = valid.sum()
        loss = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / count
        probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, local, valid, count)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        probs, local, valid, count = ctx.saved_tensors
        weight = valid.to(probs.dtype) * (grad.to(probs.dtype) / count)  # [B]
        out = probs * weight.unsqueeze(1)                                 # (softmax - onehot) * w
        onehot = torch.where(local >= 0, weight, torch.zeros_like(weight))
        out.scatter_add_(1, local.clamp(min=0).unsqueeze(1), -onehot.unsqueeze(1))
        return out.to(ctx.in_dtype), None, None, None


def sharded_cross_entropy(local_logits: Tensor, labels: Tensor, plan: ShardPlan,
                          group: ProcessGroup | None) -> Tensor:
    """Softmax cross-entropy over all plan.num_items classes, mean over rows with a label.

    local_logits [B, C_r] this rank's class columns for the global batch; labels [B] global ids in
    [0, C), or -1 to ignore a row (excluded from the mean, as F.cross_entropy's ignore_index=-1;
    like it, the result is nan when every row is ignored). Equals
    F.cross_entropy(full_logits, labels, ignore_index=-1) with full_logits [B, C] the concatenation
    of the ranks' columns. Returns an fp32 (or fp64) scalar, the same on every rank.

    Cost: forward two all-reduces of B and 2B values (MAX of the row max; one SUM carrying both the
    sum of exponentials and the target logit, which its owner alone contributes: the classic three
    all-reduces with the two sums fused); backward none, it is local: (softmax - onehot on own
    columns) / #valid rows. Memory O(B * C / W): one saved [B, C_r] softmax.
    """
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor [B] of global ids (-1 = ignore), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    _check_plan(plan, group, "sharded_cross_entropy")
    _check_logits(local_logits, labels.shape[0], plan.count, "sharded_cross_entropy")
    return _ShardedCrossEntropy.apply(local_logits, labels, plan, group)


def sharded_bce_with_logits(local_logits: Tensor, local_targets: Tensor, num_classes_total: int,
                            group: ProcessGroup | None) -> Tensor:
    """Binary cross-entropy with logits, mean over B * num_classes_total entries.

    local_logits, local_targets [B, C_r] (targets in [0, 1], e.g. `local_multi_hot`); equals
    F.binary_cross_entropy_with_logits on the full [B, C] tensors. The same scalar on every rank.
    Cost: one all-reduce of a single value (the sum of this rank's terms). Backward: local, no
    communication (the all-reduce's backward is the identity, see `all_reduce_sum`).
    """
    if local_targets.shape != local_logits.shape or local_logits.dim() != 2:
        raise ValueError(f"sharded_bce_with_logits: local_logits and local_targets must both be [B, C_r], "
                         f"got {tuple(local_logits.shape)} and {tuple(local_targets.shape)}")
    dtype = _compute_dtype(local_logits)
    local_sum = F.binary_cross_entropy_with_logits(local_logits.to(dtype), local_targets.to(dtype), reduction="sum")
    return all_reduce_sum(local_sum, group) / (local_logits.shape[0] * num_classes_total)


def local_multi_hot(targets: Tensor, plan: ShardPlan, dtype: torch.dtype = torch.float32) -> Tensor:
    """targets [B, L] global ids padded with -1 -> [B, C_r] multi-hot of this rank's columns."""
    local = plan.to_local(targets)
    local = torch.where(local >= 0, local, torch.full_like(local, plan.count))  # spare column
    out = torch.zeros(targets.shape[0], plan.count + 1, dtype=dtype, device=targets.device)
    out.scatter_(1, local, 1.0)
    return out[:, :plan.count]


@torch.no_grad()
def sharded_topk(local_scores: Tensor, k: int, plan: ShardPlan,
                 group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Top-k over all classes from class-sharded scores: (scores [B, k], global ids [B, k]).

    local_scores [B, C_r] this rank's columns. Every rank gets the same answer, best first; where
    k > num_items the tail is padded with score -inf and id -1 (as ClassifierHead.predict).
    Cost: local top-k, then two all-gathers of B * k values (candidate scores and ids), then a
    top-k over the W * k candidates. Memory O(B * k * W).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    _check_plan(plan, group, "sharded_topk")
    _check_logits(local_scores, local_scores.shape[0], plan.count, "sharded_topk")
    rows = local_scores.shape[0]
    scores, ids = local_scores.topk(min(k, plan.count), dim=1)
    ids = ids + plan.start
    if scores.shape[1] < k:  # every rank sends [B, k]
        missing = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((rows, missing), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((rows, missing), -1)], dim=1)
    world = get_world_size(group)
    if world > 1:
        sizes = [1] * world
        scores = all_gather_no_grad(scores.unsqueeze(0), group, sizes).permute(1, 0, 2).reshape(rows, world * k)
        ids = all_gather_no_grad(ids.unsqueeze(0), group, sizes).permute(1, 0, 2).reshape(rows, world * k)
    top, pos = scores.topk(k, dim=1)
    return top, ids.gather(1, pos)
