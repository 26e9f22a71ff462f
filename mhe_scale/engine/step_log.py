"""Per-step losses (and a module's metrics) kept on device until a log step, then checked and written
in one host sync: loss_log.jsonl in the run's folder and the accelerator's trackers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mhe_scale.engine.jsonl_log import read_step_lines


class NonFiniteLossError(FloatingPointError):
    """A NaN / inf training loss; the message names the first bad optimizer step and epoch."""


def trim_jsonl(path: Path, keep_up_to: int) -> None:
    """Drop the lines of steps a resumed run will redo (or all, on a fresh start)."""
    kept = [line for step, line in read_step_lines(path) if step <= keep_up_to]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in kept))


class StepLog:
    """Per-step losses kept on device until a log step, then checked and written in one sync
    (to loss_log.jsonl and, as `<prefix>train/loss` and `.../lr`, to the accelerator's trackers)."""

    def __init__(self, path: Path | None, keep_up_to: int, accelerator, desc: str, prefix: str,
                 observer: Callable[[list[dict]], None] | None = None) -> None:
        """observer(rows): called after each flush with the flushed steps' rows (finite losses), e.g.
        health.TrainingHealth.observe."""
        self.path, self.accelerator, self.desc, self.prefix = path, accelerator, desc, prefix
        self.observer = observer
        self.losses: list[Tensor] = []
        self.norms: list[Tensor] = []
        self.rows: list[dict] = []
        self.metrics: list[dict[str, Tensor]] = []
        if path is not None:
            trim_jsonl(path, keep_up_to)

    def add(self, loss: Tensor, grad_norm: Tensor | None, row: dict, metrics: dict[str, Tensor] | None = None) -> None:
        self.losses.append(loss)
        self.metrics.append(metrics or {})
        if grad_norm is not None:
            self.norms.append(grad_norm.detach().float())
        self.rows.append(row)

    def flush(self) -> float:
        """Mean loss since the last flush; raises NonFiniteLossError naming the first bad step."""
        keys = sorted(self.metrics[0]) if all(m.keys() == self.metrics[0].keys() for m in self.metrics) else []
        table = torch.stack([torch.stack([loss.float()] + [m[k].float() for k in keys]) for loss, m in
                             zip(self.losses, self.metrics)])  # [steps, 1 + metrics]: one reduce, one sync
        reduced = self.accelerator.reduce(table, "mean").tolist()
        values = [row[0] for row in reduced]
        norms = torch.stack(self.norms).tolist() if self.norms else [None] * len(values)
        rows = [dict(r, loss=v) | ({} if n is None else {"grad_norm": n}) | dict(zip(keys, extra[1:]))
                for r, v, n, extra in zip(self.rows, values, norms, reduced)]
        self.losses, self.norms, self.rows, self.metrics = [], [], [], []
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        for r in rows:
            self.accelerator.log({f"{self.prefix}train/{k}": v for k, v in r.items() if k not in ("step", "epoch")},
                                 step=r["step"])
        for r in rows:
            if not math.isfinite(r["loss"]):
                raise NonFiniteLossError(
                    f"{self.desc}: loss is {r['loss']} at optimizer step {r['step']} (epoch {r['epoch']}); "
                    "lower optim.lr, set train.clip_grad_norm, or check the inputs and labels")
        if self.observer is not None:
            self.observer(rows)
        return sum(values) / len(values)
