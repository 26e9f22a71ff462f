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
