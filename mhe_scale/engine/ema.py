"""Exponential moving average (EMA) of a model's trainable parameters, used for evaluation.

After every optimizer step: shadow <- decay * shadow + (1 - decay) * param (one fused lerp over
all tensors, no Python loop per element). Shadows are fp32 copies (fp64 stays fp64) on the
parameters' device; `applied(model)` swaps them into the model for evaluation and swaps back.
Buffers are tracked too (as timm's ModelEmaV2 does): floating ones (BatchNorm running_mean /
running_var) are averaged like the parameters, integer ones (num_batches_tracked) copied.

SWA (StochasticWeightAverage) averages weights that were never trained together, so averaged BN
statistics do not describe the averaged weights (Izmailov et al. 2018 recompute them):
`update_bn(model, batches)` recomputes BN running statistics with a pass in train mode, and
`refresh_average_bn` does that for the SWA weights after training (engine.fit calls it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _shadow_of(t: Tensor) -> Tensor:
    """An fp32 (fp64 stays fp64) detached copy."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).clone()


class ExponentialMovingAverage:
    """EMA of `model`'s parameters that require grad and of its buffers, keyed by name."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must lie in (0, 1), e.g. 0.999")
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.shadows = [_shadow_of(p) for p in self.params]
        named_buffers = [(n, b) for n, b in model.named_buffers() if b is not None]
        self.buffer_names = [n for n, _ in named_buffers]
        self.buffers = [b for _, b in named_buffers]
        self.buffer_shadows = [_shadow_of(b) if b.is_floating_point() else b.detach().clone() for b in self.buffers]
        self._float = [i for i, b in enumerate(self.buffers) if b.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """shadow += (1 - decay) * (live - shadow) for every parameter and floating buffer."""
        self._lerp(1.0 - self.decay)

    @torch.no_grad()
    def _lerp(self, weight: float) -> None:
        """shadow += weight * (live - shadow) for parameters and floating buffers; integer buffers copied."""
        pairs = list(zip(self.shadows, self.params)) + [(self.buffer_shadows[i], self.buffers[i]) for i in self._float]
        if pairs:
            torch._foreach_lerp_([s for s, _ in pairs], [t.detach().to(s.dtype) for s, t in pairs], weight)
        for s, b in zip(self.buffer_shadows, self.buffers):
            if not b.is_floating_point():
                s.copy_(b)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current parameters and buffers."""
        for s, t in zip(self.shadows + self.buffer_shadows, self.params + self.buffers):
            s.copy_(t)

    @torch.no_grad()
    def capture_buffers(self) -> None:
        """Take the model's current buffers as the average's (after update_bn inside applied())."""
        for s, b in zip(self.buffer_shadows, self.buffers):
            s.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """{parameter or buffer name: shadow tensor}; safe to write with safetensors."""
        return {n: s for n, s in zip(self.names + self.buffer_names, self.shadows + self.buffer_shadows)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Strict for parameters; buffers missing from `state` (checkpoints written before buffers were
        tracked) are taken from the model as it is now (load the model first, as load_checkpoint does)."""
        missing = sorted(set(self.names) - set(state))
        extra = sorted(set(state) - set(self.names) - set(self.buffer_names))
        if missing or extra:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, s, live in zip(self.names + self.buffer_names, self.shadows + self.buffer_shadows,
                              self.params + self.buffers):
            if n not in state:
                s.copy_(live)
                continue
            if state[n].shape != s.shape:
                raise ValueError(f"EMA state for {n!r} has shape {tuple(state[n].shape)}, model has {tuple(s.shape)}")
            s.copy_(state[n])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model's parameters and buffers hold the averaged ones; restored afterwards."""
        live = self.params + self.buffers
        backup = [t.detach().clone() for t in live]
        with torch.no_grad():
            for t, s in zip(live, self.shadows + self.buffer_shadows):
                t.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, b in zip(live, backup):
                    t.copy_(b)


class StochasticWeightAverage(ExponentialMovingAverage):
    """SWA: the equal-weight mean of the parameters taken every `every` optimizer steps from
    step `start` on (Izmailov et al. 2018), with the same interface as the EMA.
    Floating buffers are averaged the same way until `refresh_average_bn` recomputes BN
    statistics for the averaged weights (engine.fit does after training; evaluations during
    training use the averaged statistics).

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
        self._lerp(1.0 / self.samples)

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


BN_UPDATE_BATCHES = 100
"""Training micro-batches `refresh_average_bn` reads by default: the BN statistics are cumulative
averages, so 100 batches of 64+ samples pin them well; a full epoch (torch's update_bn) would cost
an epoch of forwards on the datasets this library is for."""


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of model that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def update_bn(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None,
              max_batches: int | None = None) -> int:
    """Recompute the BatchNorm running statistics of `model` from `batches` and return how many were read.

    Statistics are reset, then every BN accumulates the plain (cumulative) average over batches of
    its batch mean and unbiased batch variance (momentum None), with the model in train mode and no
    gradients, as torch.optim.swa_utils.update_bn does. `forward(batch)` runs the model (default
    `model(batch)`); at most `max_batches` are read. Train/eval mode and momenta are restored.
    A model without BN is left untouched (0 returned, nothing read).
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    modes = [m.training for m in model.modules()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            (forward or model)(batch)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    if seen == 0:
        raise ValueError("update_bn read no batch: the BN statistics were reset and not recomputed; pass the "
                         "training batches")
    return seen


def refresh_average_bn(average: ExponentialMovingAverage | None, model: nn.Module, batches: Iterable[Any],
                       forward: Callable[[Any], Any] | None = None,
                       reduce: Callable[[Tensor], Tensor] | None = None,
                       max_batches: int | None = BN_UPDATE_BATCHES) -> int:
    """After training: the BN statistics of an SWA's averaged weights, recomputed by `update_bn` over
    (at most `max_batches` of) `batches` and stored in the average; returns the batches read.

    Does nothing (returns 0, reads nothing) for no average, an EMA (its statistics are averaged
    along with the weights, as timm does), an SWA that took no sample yet (it equals the live
    model) or a model without BN. `reduce(t)` (e.g. `lambda t: accelerator.reduce(t, "mean")`)
    averages each recomputed statistic over processes, so every process evaluates the same model.
    """
    if not isinstance(average, StochasticWeightAverage) or average.samples == 0 or not batch_norms(model):
        return 0
    with average.applied():
        seen = update_bn(model, batches, forward, max_batches)
        if reduce is not None:
            with torch.no_grad():
                for m in batch_norms(model):
                    for b in (m.running_mean, m.running_var):
                        b.copy_(reduce(b.detach().clone()))
        average.capture_buffers()
    return seen


def refresh_fit_average_bn(average: ExponentialMovingAverage | None, weights: nn.Module, module: nn.Module,
                           loader: Iterable[tuple[Any, Any]], accelerator, dtype: torch.dtype | None = None) -> int:
    """engine.fit's hook after training: `refresh_average_bn` of `weights` (what the average covers)
    over the training loader's (inputs, targets) batches, each run through the training module
    (its loss is ignored) on the accelerator's device (floating inputs cast to `dtype` if given)
    under its autocast, statistics averaged over processes."""
    from accelerate.utils import send_to_device

    from mhe_scale.engine.accelerator import cast_floating

    def forward(batch: Any) -> Any:
        inputs, targets = send_to_device(batch, accelerator.device)
        return module(cast_floating(inputs, dtype), targets)

    with accelerator.autocast():
        return refresh_average_bn(average, weights, iter(loader), forward, lambda t: accelerator.reduce(t, "mean"))
