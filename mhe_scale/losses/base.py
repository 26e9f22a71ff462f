"""The criterion contract, its registry, and the masking / reduction every criterion shares.

A criterion is a module (or callable) `criterion(inputs, targets) -> (loss, metrics)`:
inputs are logits (or cosines, or features) [B, C]; loss is a scalar Tensor to call backward on;
metrics are detached scalar Tensors worth logging (no host sync: never `.item()` here). A
criterion never mutates its inputs or targets. Half-precision inputs are computed in fp32.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

Metrics = dict[str, Tensor]
REDUCTIONS = ("mean", "sum")


class Criterion(Protocol):
    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]: ...


_LOSSES: dict[str, Callable[..., Criterion]] = {}


def register_loss(name: str) -> Callable[[Callable[..., Criterion]], Callable[..., Criterion]]:
    """Decorator: make a criterion class (or factory) buildable as build_loss(name, **kwargs)."""
    def add(factory: Callable[..., Criterion]) -> Callable[..., Criterion]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = factory
        return factory
    return add


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str, **kwargs: object) -> Criterion:
    """The criterion `name` with its keyword arguments; unknown names or arguments raise ValueError."""
    if name not in _LOSSES:
        raise ValueError(f"loss {name!r} is not registered; choose one of {list_losses()}")
    factory = _LOSSES[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} does not take {unknown}; it takes {accepted}")
    return factory(**kwargs)


def check_reduction(reduction: str, who: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{who}: reduction={reduction!r} must be one of {REDUCTIONS}")
    return reduction


def compute_dtype(x: Tensor) -> torch.dtype:
    """fp16 / bf16 inputs are computed in fp32; fp32 / fp64 stay as they are."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def reduce_kept(elementwise: Tensor, keep: Tensor, reduction: str) -> Tensor:
    """Sum, or mean over kept entries, of elementwise losses (any shape; keep: bool, same shape).

    Dropped entries contribute neither value nor gradient; with nothing kept the mean is 0.
    """
    total = torch.where(keep, elementwise, torch.zeros_like(elementwise)).sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp_min(1).to(total.dtype)


def check_multilabel(inputs: Tensor, targets: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor]:
    """inputs [B, C] and dense targets [B, C] (1 positive, 0 negative, < 0 ignored) -> (x, y, keep),
    x in the compute dtype, y in {0, 1} as x's dtype, keep bool [B, C]; new tensors, inputs untouched."""
    if inputs.dim() != 2 or targets.shape != inputs.shape:
        raise ValueError(f"{who}: inputs must be [B, C] and targets the same shape (dense, < 0 = ignore; "
                         f"mhe_scale.labels.targets.multi_hot makes them from padded lists), got "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    x = inputs.to(compute_dtype(inputs))
    keep = targets >= 0
    return x, (targets > 0).to(x.dtype), keep


def precision_at_1(scores: Tensor, targets: Tensor) -> Tensor:
    """Fraction of rows [B, C] whose best-scoring class is a positive (ignored entries count as misses)."""
    top = scores.detach().argmax(dim=1, keepdim=True)
    return (targets.gather(1, top) > 0).float().mean()
