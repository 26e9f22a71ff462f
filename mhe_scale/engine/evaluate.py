"""Evaluation across processes: XMC metrics of model.predict over a test set, and saved predictions.

Each of P processes scores a contiguous 1/P of the test set in the same number of batches (a
class-sharded head's predict is collective), and the metric sums are all-reduced, so every process
returns the metrics of the whole set. Predictions, when asked for, are written by each rank for its
part and joined by the main process in test-set order.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mhe_scale.engine.accelerator import cast_floating, full_parameters, input_dtype
from mhe_scale.engine.ema import ExponentialMovingAverage
from mhe_scale.engine.model import Classifier
from mhe_scale.eval.xmc import XMCMetrics


def rank_batches(num_samples: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s evaluation batches: its contiguous 1/world of [0, N) cut into the SAME number
    of batches on every rank (sizes differ by at most one; some may be empty), since a class-sharded
    head's predict is collective."""
    lo, hi = rank * num_samples // world, (rank + 1) * num_samples // world
    most = -(-num_samples // world)
    count = max(1, -(-most // batch_size))
    return [chunk.tolist() for chunk in torch.arange(lo, hi).tensor_split(count)]


def _collate(test_set: Dataset, indices: list[int]) -> Any:
    from torch.utils.data import default_collate

    if indices:
        # one batched fetch where the dataset offers it (as torch's DataLoader does), so datasets
        # that build a batch at once (CSR rows, padded text, DALI decode) are not read per point
        getitems = getattr(test_set, "__getitems__", None)
        return default_collate(getitems(indices) if getitems is not None else [test_set[i] for i in indices])
    from accelerate.utils import recursively_apply

    return recursively_apply(lambda t: t[:0], default_collate([test_set[0]]))


def _write_predictions(path: Path, lines: list[str], accelerator, rank: int, world: int) -> None:
    """One file in test-set order: each rank's contiguous part, joined by the main process; atomic."""
    from mhe_scale.engine.serialize import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    if world == 1:
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return
    part = path.with_name(f"{path.name}.part{rank}-of-{world}")
    part.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [path.with_name(f"{path.name}.part{r}-of-{world}") for r in range(world)]
        atomic_write_text(path, "".join(p.read_text(encoding="utf-8") for p in parts))
        for p in parts:
            p.unlink()
    accelerator.wait_for_everyone()


@torch.no_grad()
def evaluate(model: Classifier, test_set: Dataset, ks: list[int], batch_size: int,
             inv_propensity: Tensor | None = None, desc: str = "eval",
             ema: ExponentialMovingAverage | None = None, accelerator=None,
             predictions_to: str | Path | None = None, prediction_k: int | None = None,
             written_ids: Tensor | None = None) -> dict[str, float]:
    """P@k, nDCG@k (and PSP@k with propensities) of model.predict over test_set (EMA weights if given).

    With an accelerator of P processes, each evaluates a contiguous 1/P of test_set and the metric
    sums are all-reduced: every process returns the metrics of the WHOLE set. `model` is the
    Classifier given to fit (not the prepared wrapper); every process must call this.
    `predictions_to`: also write the top-`prediction_k` (default max(ks)) predictions there, one
    line of 'id:score' pairs per test point in test-set order (data.xc_format.read_predictions),
    label y written as written_ids[y] when given (e.g. the file's id of a renumbered label).
    """
    from mhe_scale.data.xc_format import format_predictions

    k = max(max(ks), prediction_k or 0)
    lines: list[str] = []
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    device = accelerator.device if accelerator is not None else None
    cast = input_dtype(accelerator, model) if accelerator is not None else None
    was_training = model.training
    model.eval()
    metrics = XMCMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    gather = full_parameters(accelerator, model) if accelerator is not None else contextlib.nullcontext()
    with gather, ema.applied() if ema is not None else contextlib.nullcontext():
        for indices in tqdm(rank_batches(len(test_set), batch_size, rank, world), desc=desc, leave=False,
                            mininterval=1.0, disable=rank != 0):
            inputs, targets = _collate(test_set, indices)
            if device is not None:
                from accelerate.utils import send_to_device

                inputs, targets = send_to_device((inputs, targets), device)
            scores, ids = model.predict(cast_floating(inputs, cast), k)
            metrics.update(ids[:, :max(ks)], targets)
            if predictions_to is not None:
                keep = prediction_k or max(ks)
                top = ids[:, :keep].cpu()
                if written_ids is not None:
                    top = torch.where(top >= 0, written_ids[top.clamp(min=0)], top)
                lines += format_predictions(scores[:, :keep].cpu(), top)
    if world > 1:
        metrics.load_state(accelerator.reduce(metrics.state().to(accelerator.device), "sum"))
    if predictions_to is not None:
        _write_predictions(Path(predictions_to), lines, accelerator, rank, world)
    model.train(was_training)
    return metrics.compute()
