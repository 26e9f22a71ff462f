"""Learning-rate schedules: linear warmup, then constant, cosine or polynomial decay; or one-cycle.

Steps are OPTIMIZER steps (one per `grad_accum_steps` micro-batches), the unit of
`TrainPlan.total_steps`. `lr_factor(s)` is the multiplier of the base lr used by the (s+1)-th
optimizer step, i.e. after s steps have been taken (torch's LambdaLR convention):

    warmup  s < W:   (s + 1) / W                      (the first step already moves: lr / W)
    after   p = clamp((s - W) / (T - W), 0, 1)
            constant 1
            cosine   r + (1 - r) * (1 + cos(pi * p)) / 2
            poly     r + (1 - r) * (1 - p) ** power
with W = warmup_steps, T = total_steps, r = min_lr_ratio. lr_factor(T) == r for cosine / poly.
    onecycle (Smith & Topin 2019, as torch's OneCycleLR with cosine annealing): from i = initial_lr_ratio
            up to 1 over steps 0..W-1, then down to r at step T-1, both halves cosine:
            s <= W-1: i + (1 - i) * (1 - cos(pi * s / (W - 1))) / 2
            s >  W-1: r + (1 - r) * (1 + cos(pi * (s - W + 1) / (T - W))) / 2
The scheduler is not passed through `accelerator.prepare`: accelerate's wrapper would step it once
per process per call; the loop steps it itself, only when the optimizer stepped.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "poly", "onecycle")


def check_schedule(schedule: str, warmup_steps: int, min_lr_ratio: float, poly_power: float) -> None:
    """Raise ValueError naming the bad train.* key."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r} is not known; choose one of {SCHEDULES}")
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio={min_lr_ratio} must lie in [0, 1]")
    if poly_power <= 0.0:
        raise ValueError(f"train.poly_power={poly_power} must be > 0")


def _onecycle(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, initial_lr_ratio: float) -> float:
    peak = max(warmup_steps, 1) - 1
    if step <= peak:
        progress = step / peak if peak > 0 else 1.0
        return initial_lr_ratio + (1.0 - initial_lr_ratio) * 0.5 * (1.0 - math.cos(math.pi * progress))
    progress = min(1.0, (step - peak) / max(1, total_steps - 1 - peak))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
              min_lr_ratio: float = 0.0, poly_power: float = 1.0, initial_lr_ratio: float = 0.04) -> float:
    """Multiplier of the base lr after `step` optimizer steps (see the module doc)."""
    if schedule == "onecycle":
        return _onecycle(step, total_steps, warmup_steps, min_lr_ratio, initial_lr_ratio)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "poly":
        shape = (1.0 - progress) ** poly_power
    else:
        raise ValueError(f"train.schedule={schedule!r} is not known; choose one of {SCHEDULES}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    schedule: str = "constant", min_lr_ratio: float = 0.0,
                    poly_power: float = 1.0, initial_lr_ratio: float = 0.04) -> LambdaLR:
    """A LambdaLR applying lr_factor to every parameter group (each keeps its own base lr).

    Call it on the raw optimizer before `accelerator.prepare`, and step it once per optimizer step.
    """
    check_schedule(schedule, warmup_steps, min_lr_ratio, poly_power)

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no callables
        return lr_factor(step, total_steps, warmup_steps, schedule, min_lr_ratio, poly_power, initial_lr_ratio)

    return LambdaLR(optimizer, factor)
