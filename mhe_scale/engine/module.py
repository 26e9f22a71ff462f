"""The training-module contract that `fit` drives.

A training module turns a batch into `(loss, metrics)`:

    loss, metrics = module(inputs, targets)    # loss: scalar tensor; metrics: {name: scalar tensor}

`fit` owns what every run shares (devices, DDP / ZeRO, precision, accumulation, clipping, schedules,
EMA/SWA, checkpoints, resume, logging); the module owns what differs between kinds of training
(one encoder + head; two encoders with a queue; a joint loss). Besides `forward` it may override:

- `checkpoint_module()`: the module whose state_dict checkpoints store and EMA/SWA average
  (default: the module itself). Its parameter names are the checkpoint's names.
- `class_sharded_head()`: a head whose classes are split over the processes (mhe_scale.parallel).
  It must NOT be a registered sub-module (so DDP never averages and ZeRO never partitions it); fit
  steps it with its own optimizer (`fit(..., head_optimizer=...)`), clips it with the global norm
  and writes one shard file per rank.
- `zero3_leaf_modules()`: sub-modules whose parameters ZeRO-3 gathers whole when they run (modules
  that read their children's weights directly). They must return tensors (or tuples / dicts).
- `extra_state()`: state outside the registered parameters (a momentum encoder kept out of DDP, a
  queue, a sampling generator) saved and loaded by every process with each checkpoint.
- `after_optimizer_step(step)`: runs after every optimizer step (momentum-encoder updates, queues).
- `chance_losses()`: {"loss" or a metric name: its value when the model predicts no better than the
  label frequencies}, e.g. {"loss": ln C} for a C-way softmax; fit's training-health check (health.py)
  warns when a run sits at it. Default: {} (no such level known).

Metrics are averaged over the micro-batches of an optimizer step and over processes, and logged
with the loss (loss_log.jsonl and the trackers). They must be detached scalars; return the same
keys at every step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mhe_scale.engine.checkpoint import ExtraState

Metrics = dict[str, Tensor]


class TrainingModule(nn.Module):
    """Base class of everything `fit` trains; subclasses implement forward(inputs, targets)."""

    def forward(self, inputs: Any, targets: Any) -> tuple[Tensor, Metrics]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.forward(inputs, targets) -> (loss, metrics)")

    def checkpoint_module(self) -> nn.Module:
        """What checkpoints store and EMA/SWA average (its state_dict names are the file's names)."""
        return self

    def class_sharded_head(self) -> nn.Module | None:
        """The class-sharded head trained beside DDP / ZeRO with its own optimizer, or None."""
        return None

    def zero3_leaf_modules(self) -> list[nn.Module]:
        """Sub-modules ZeRO-3 must gather whole when they run."""
        return []

    def extra_state(self) -> list[ExtraState]:
        """Per-process state saved with every checkpoint beside the registered parameters."""
        return []

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based) on every process."""

    def chance_losses(self) -> dict[str, float]:
        """{"loss" or a logged metric name: its chance-level value}; {} when unknown."""
        return {}
