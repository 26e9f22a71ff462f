"""Exponential moving average (EMA) of a model's trainable parameters, used for evaluation.

After every optimizer step: shadow <- decay * shadow + (1 - decay) * param (one fused lerp over
all tensors, no Python loop per element). Shadows are fp32 copies (fp64 stays fp64) on the
parameters' device; `applied(model)` swaps them into the model for evaluation and swaps back.
Buffers (e.g. BatchNorm statistics) are not averaged: they are the live model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ExponentialMovingAverage:
    """EMA of `model`'s parameters that require grad, keyed by parameter name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must lie in (0, 1), e.g. 0.999")
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.shadows = [p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32).clone()
                        for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow += (1 - decay) * (param - shadow) for every tracked parameter."""
        if not self.shadows:
            return
        current = [p.detach().to(s.dtype) for p, s in zip(self.params, self.shadows)]
        torch._foreach_lerp_(self.shadows, current, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current parameters."""
        for p, s in zip(self.params, self.shadows):
            s.copy_(p)

    def state_dict(self) -> dict[str, Tensor]:
        """{parameter name: shadow tensor}; safe to write with safetensors."""
        return {n: s for n, s in zip(self.names, self.shadows)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        extra = sorted(set(state) - set(self.names))
        if missing or extra:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, s in zip(self.names, self.shadows):
            if state[n].shape != s.shape:
                raise ValueError(f"EMA state for {n!r} has shape {tuple(state[n].shape)}, model has {tuple(s.shape)}")
            s.copy_(state[n])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's parameters hold the EMA weights; restored afterwards."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadows):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


class StochasticWeightAverage(ExponentialMovingAverage):
    """SWA: the equal-weight mean of the parameters taken every `every` optimizer steps from
    step `start` on (Izmailov et al. 2018), with the same interface as the EMA.

    `update()` is called after every optimizer step; it counts steps itself. The n-th sample
    enters as shadow += (param - shadow) / n, so the shadow is exactly the mean of the samples.
    Before the first sample the shadows follow the live weights (evaluating early is harmless).
    """

    COUNT_KEY = "__swa_samples__"
    STEP_KEY = "__swa_steps__"

    def __init__(self, model: nn.Module, start: int, every: int = 1) -> None:
        if start < 0 or every < 1:
            raise ValueError(f"SWA needs train.swa_start >= 0 and train.swa_every >= 1, got {start}, {every}")
        super().__init__(model, decay=0.5)
        self.start, self.every = int(start), int(every)
        self.steps = 0
        self.samples = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        if self.steps < self.start or (self.steps - self.start) % self.every != 0:
            if self.samples == 0:
                self.reset()
            return
        self.samples += 1
        current = [p.detach().to(s.dtype) for p, s in zip(self.params, self.shadows)]
        torch._foreach_lerp_(self.shadows, current, 1.0 / self.samples)

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state[self.COUNT_KEY] = torch.tensor(self.samples, dtype=torch.int64)
        state[self.STEP_KEY] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self.samples = int(state.pop(self.COUNT_KEY))
        self.steps = int(state.pop(self.STEP_KEY))
        super().load_state_dict(state)


def uses_weight_average(cfg) -> bool:
    """Does the TrainConfig ask for EMA or SWA?"""
    return cfg.ema_decay is not None or cfg.swa_start is not None or cfg.swa_start_epoch is not None


def build_weight_average(model: nn.Module, cfg, steps_per_epoch: int | None = None) -> ExponentialMovingAverage | None:
    """The weight average a TrainConfig asks for: EMA (train.ema_decay), SWA (train.swa_start or
    train.swa_start_epoch x steps_per_epoch, train.swa_every) or none; asking for two is an error."""
    asked = [k for k in ("ema_decay", "swa_start", "swa_start_epoch") if getattr(cfg, k) is not None]
    if len(asked) > 1:
        raise ValueError(f"set one of train.ema_decay (EMA), train.swa_start or train.swa_start_epoch (SWA), not "
                         f"both: {asked} are set")
    if cfg.ema_decay is not None:
        return ExponentialMovingAverage(model, cfg.ema_decay)
    if cfg.swa_start_epoch is not None:
        if steps_per_epoch is None:
            raise ValueError("train.swa_start_epoch needs the run's steps per epoch (engine.fit passes them)")
        if cfg.swa_start_epoch < 0:
            raise ValueError(f"train.swa_start_epoch={cfg.swa_start_epoch} must be >= 0")
        return StochasticWeightAverage(model, round(cfg.swa_start_epoch * steps_per_epoch), cfg.swa_every)
    if cfg.swa_start is not None:
        return StochasticWeightAverage(model, cfg.swa_start, cfg.swa_every)
    return None
