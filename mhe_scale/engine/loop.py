"""Training and evaluation loops on HF accelerate (single process, DDP or DeepSpeed launches).

The loop knows nothing about a head's math: it calls `model(inputs, targets).loss`,
`accelerator.backward`, steps, and logs throughput. Derived numbers live in a frozen TrainPlan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mhe_scale.config import TrainConfig
from mhe_scale.engine.model import Classifier
from mhe_scale.eval.xmc import XMCMetrics


@dataclass(frozen=True)
class TrainPlan:
    """Quantities derived once from the config and the data; logged, never written back."""

    num_train: int
    num_processes: int
    micro_batch: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int

    @staticmethod
    def build(cfg: TrainConfig, num_train: int, num_processes: int) -> "TrainPlan":
        global_batch = cfg.batch_size * num_processes
        steps_per_epoch = max(1, num_train // global_batch)
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        return TrainPlan(num_train, num_processes, cfg.batch_size, global_batch, steps_per_epoch, total)


@dataclass(frozen=True)
class FitResult:
    steps: int
    seconds: float
    samples_per_second: float
    last_loss: float


class NonFiniteLossError(FloatingPointError):
    pass


def fit(model: Classifier, optimizer: torch.optim.Optimizer, train_set: Dataset, cfg: TrainConfig,
        accelerator, desc: str = "train") -> FitResult:
    """Train for cfg.epochs over train_set; raises NonFiniteLossError on a NaN/inf loss."""
    plan = TrainPlan.build(cfg, len(train_set), accelerator.num_processes)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    step, samples, last = 0, 0, float("nan")
    bar = tqdm(total=plan.total_steps, desc=desc, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True, mininterval=1.0)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device)
    while step < plan.total_steps:
        for inputs, targets in loader:
            out = model(inputs, targets)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += out.loss.detach()
            step += 1
            samples += plan.global_batch
            if step % cfg.log_every == 0 or step == plan.total_steps:
                last = float(loss_sum) / (cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every)
                loss_sum.zero_()
                if not math.isfinite(last):
                    raise NonFiniteLossError(
                        f"{desc}: loss became {last} by step {step}; lower optim.lr or check the data/labels")
                rate = samples / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{last:.4f}", samples_s=f"{rate:,.0f}")
            bar.update(1)
            if step >= plan.total_steps:
                break
    bar.close()
    seconds = time.perf_counter() - start
    return FitResult(step, seconds, samples / seconds, last)


@torch.no_grad()
def evaluate(model: Classifier, test_set: Dataset, ks: list[int], batch_size: int,
             inv_propensity: Tensor | None = None, desc: str = "eval") -> dict[str, float]:
    """P@k, nDCG@k (and PSP@k with propensities) of model.predict over test_set."""
    model.eval()
    metrics = XMCMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    loader = DataLoader(test_set, batch_size=batch_size)
    for inputs, targets in tqdm(loader, desc=desc, leave=False, mininterval=1.0):
        _, ids = model.predict(inputs, max(ks))
        metrics.update(ids, targets)
    model.train()
    return metrics.compute()
