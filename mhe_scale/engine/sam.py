"""Sharpness-Aware Minimization (Foret et al. 2021) as a second pass inside fit's optimizer step.

With train.sam_rho = rho, each optimizer step is:
    g  = grad L(w)                      (the usual forward / backward; gradients averaged over processes)
    e  = rho * g / ||g||                (one global L2 norm over every trained parameter)
    g' = grad L(w + e)                  (a second forward / backward at the perturbed weights)
    w  <- optimizer step with g' at w   (the perturbation is removed before the step)
The loss logged is the first pass's. Batch-norm running statistics are not updated by the second
pass (they are restored after it), as the common implementations do. Refused where it
cannot be exact here: DeepSpeed (it owns backward and the step), a class-sharded head (its rows
would need their own all-reduced norm), gradient accumulation > 1 and fp16.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def check_sam(rho: float | None, *, deepspeed: bool, sharded: bool, grad_accum_steps: int,
              mixed_precision: str) -> None:
    """Raise NotImplementedError / ValueError naming train.sam_rho where SAM cannot run exactly."""
    if rho is None:
        return
    if not rho > 0:
        raise ValueError(f"train.sam_rho={rho} must be > 0 (or null: no SAM); the paper uses 0.05")
    reasons = [why for bad, why in ((deepspeed, "DeepSpeed owns backward and the optimizer step"),
                                    (sharded, "a class-sharded head is not supported"),
                                    (grad_accum_steps > 1, "train.grad_accum_steps > 1 is not supported"),
                                    (mixed_precision == "fp16", "fp16's loss scale would reach the norm"))
               if bad]
    if reasons:
        raise NotImplementedError(f"train.sam_rho={rho}: {'; '.join(reasons)}; set train.sam_rho=null")


def frozen_bn_statistics(module: nn.Module) -> contextlib.AbstractContextManager:
    """Batch-norm layers normalise with the batch as usual; their running statistics are put back
    afterwards (the same restore activation checkpointing uses, models/checkpointing.py)."""
    from mhe_scale.models.checkpointing import running_stats_restored, tracking_norms

    return running_stats_restored(tracking_norms(module))


@torch.no_grad()
def perturb(params: list[nn.Parameter], rho: float) -> list[tuple[nn.Parameter, Tensor]]:
    """w += rho * g / ||g|| for every parameter with a gradient; returns what to subtract back."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return []
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]).float()
    scale = rho / (norm + 1e-12)
    moved = []
    for p in with_grad:
        e = (p.grad.float() * scale).to(p.dtype)
        p.add_(e)
        moved.append((p, e))
    return moved


@torch.no_grad()
def restore(moved: list[tuple[nn.Parameter, Tensor]]) -> None:
    for p, e in moved:
        p.sub_(e)
