"""A class-sharded head beside what accelerate prepares (see engine/module.py for the contract).

A training module is prepared whole (DDP / DeepSpeed): its registered parameters are averaged or
partitioned. A class-sharded head (mhe_scale.parallel, rank r holds classes [start, end)) is
returned by `module.class_sharded_head()` and is not a registered sub-module: it stays outside DDP
(its gradients must not be averaged: each rank holds different rows) and outside ZeRO (no
partitioning of what is already sharded); it all-gathers the features itself, with the xW backward
that undoes the backbone's gradient averaging. `ShardedHeadTraining` holds its optimizer and lr
schedule, steps them only when `accelerator.sync_gradients`, clips with the global norm over the
module and every shard (replicated head parameters counted once), and saves / loads each rank's shard (+ optimizer state) through an
ExtraState (mhe_scale.parallel.checkpoint: per-rank files that reshard on load), plus the state of
a sampling head's own generator so that a resumed run draws the same groups / negatives as an
uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mhe_scale.engine.checkpoint import ExtraState


def is_class_sharded(head: nn.Module) -> bool:
    """True for the heads of mhe_scale.parallel (a ShardPlan and named sharded parameters)."""
    from mhe_scale.parallel.sharded_heads import ShardedMixin

    return isinstance(head, ShardedMixin)


def sharded_parameters(head: nn.Module) -> list[nn.Parameter]:
    """The parameters of a class-sharded head that differ per rank (its `sharded_parameters` names);
    the others (e.g. MHC's group layer and projections) are replicated: equal on every rank, with
    equal gradients, so a global norm counts them once, not once per rank."""
    named = dict(head.named_parameters())
    missing = [n for n in head.sharded_parameters if n not in named]  # type: ignore[attr-defined]
    if missing:
        raise ValueError(f"{type(head).__name__}.sharded_parameters names {missing}, which are not its parameters")
    return [named[n] for n in head.sharded_parameters]  # type: ignore[attr-defined]


class Schedulers:
    """The encoder's and the sharded head's lr schedules, checkpointed as one JSON object."""

    def __init__(self, encoder: Any, head: Any) -> None:
        self.encoder, self.head = encoder, head

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"encoder", "head"}:
            raise ValueError("this checkpoint's lr schedule was saved without a class-sharded head; resume it with "
                             "the head it was trained with")
        self.encoder.load_state_dict(state["encoder"])
        self.head.load_state_dict(state["head"])


class ShardedHeadTraining:
    """A class-sharded head's optimizer, schedule, clipping and per-rank checkpoint files."""

    def __init__(self, head: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.head, self.optimizer, self.scheduler = head, optimizer, scheduler
        if hasattr(optimizer, "set_lr_schedule") and hasattr(scheduler, "lr_lambdas"):
            # row-sparse heads catch skipped rows up at each skipped step's own lr (exact under any schedule):
            # step t (1-based) runs at base_lr * factor(t - 1), LambdaLR's convention (engine/schedule.py)
            optimizer.set_lr_schedule(lambda index, t: scheduler.base_lrs[index] * scheduler.lr_lambdas[index](t - 1))
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.sharded_ids = {id(p) for p in sharded_parameters(head)}
        self.dtype = next((p.dtype for p in self.params if p.is_floating_point()), torch.float32)

    def step(self) -> None:
        """Optimizer step, schedule step, zero grads: call only when accelerator.sync_gradients."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def clip_(self, accelerator, encoder_params: list[nn.Parameter], max_norm: float) -> Tensor:
        """Clip encoder and head gradients together by their global L2 norm, returned (pre-clip).

        Encoder gradients are identical on every rank after DDP, and so are those of the head's
        replicated parameters (e.g. MHC's group layer and projections); only the squared norm of the
        sharded ones is summed over ranks (one all-reduce of one number), so the norm equals the
        single-process one."""
        from mhe_scale.optim.rows import row_sparse_leaves

        sparse = row_sparse_leaves(self.params)  # row-sparse heads: the summed gradients of this rank's rows
        params = [p for p in encoder_params + self.params if p.grad is not None] + sparse
        sharded_ids = self.sharded_ids | {id(p) for p in sparse}

        def squared_norm(grads: list[Tensor]) -> Tensor:
            if not grads:
                return torch.zeros((), dtype=torch.float64, device=accelerator.device)
            return torch.nn.utils.get_total_norm(grads).double().square().to(accelerator.device)

        same_sq = squared_norm([p.grad for p in params if id(p) not in sharded_ids])
        sharded_sq = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for p in params:
            if id(p) in sharded_ids:
                sharded_sq = sharded_sq + _squared_norm64(p.grad).to(accelerator.device)
        if accelerator.num_processes > 1:
            sharded_sq = accelerator.reduce(sharded_sq.reshape(1), "sum")[0]
        total = (same_sq + sharded_sq).sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total.float()

    def extra_state(self) -> ExtraState:
        """This rank's `head-shard-{rank}-of-{W}.safetensors` (rows, class range, optimizer state) and,
        for a head that samples, `head-rng-rank{rank}-of-{W}.safetensors` (its generator's state)."""
        from mhe_scale.parallel.checkpoint import load_head_shard, save_head_shard
        from mhe_scale.parallel.head_rng import load_head_rng, save_head_rng

        def save(folder: Path) -> None:
            save_head_shard(folder, self.head, self.optimizer)
            save_head_rng(folder, self.head)

        def load(folder: Path) -> None:
            load_head_shard(folder, self.head, self.optimizer)
            load_head_rng(folder, self.head)

        return ExtraState("class-sharded head", save, load)


NORM_CHUNK_ROWS = 1 << 16
"""_squared_norm64 reads a gradient this many rows at a time (its float64 copy: 65,536 x D x 8 bytes at most)."""


def _squared_norm64(grad: Tensor) -> Tensor:
    """sum(grad^2) accumulated in float64 -> a 0-dim float64 tensor. Summed in float32, the norm of a dense head
    gradient [C, D] (zeros in the skipped rows) and of its row-sparse leaf [U, D] round differently, and one ulp
    in the clip coefficient is enough for a face run's sparse and dense losses to drift apart (docs/engine.md);
    in float64 the two sums agree to ~1e-16 and the float32 coefficient they give is the same."""
    rows = grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(-1, 1)
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    for chunk in rows.split(NORM_CHUNK_ROWS):
        total = total + torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
    return total


def check_optimizers(model: nn.Module, optimizer: torch.optim.Optimizer,
                     head_optimizer: torch.optim.Optimizer | None) -> None:
    """Raise ValueError unless the parameters are split as the module's class-sharded head (if any) requires."""
    head = model.class_sharded_head()
    if head is None:
        if head_optimizer is not None:
            raise ValueError("head_optimizer is only for class-sharded heads (mhe_scale.parallel); this head is "
                             "replicated: give its parameters to `optimizer`")
        return
    head_ids = {id(p) for p in head.parameters()}
    in_main = [p for g in optimizer.param_groups for p in g["params"] if id(p) in head_ids]
    if head_optimizer is None:
        raise ValueError("the head is class-sharded: pass its own optimizer as fit(..., head_optimizer=...) and "
                         "keep its parameters out of `optimizer` (which accelerate prepares for the encoder)")
    if in_main:
        raise ValueError(f"`optimizer` holds {len(in_main)} parameters of the class-sharded head; give them only "
                         "to head_optimizer (DDP/ZeRO would average or partition them)")
    stray = [p for g in head_optimizer.param_groups for p in g["params"] if id(p) not in head_ids]
    if stray:
        raise ValueError(f"head_optimizer holds {len(stray)} parameters that are not the head's")
