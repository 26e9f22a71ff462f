"""The XMC tasks' evaluation: P@k, RP@k, nDCG@k (PSP@k with propensities) of model.predict over a test
set across processes, and the saved prediction files (tools/eval_xmc.py reads them; their scores are
the head's `predict` scores, log-probabilities, on which eval_xmc tunes micro-F1's threshold).

Each rank scores its contiguous part (eval/distributed.py) and the metric sums are all-reduced, so
every process returns the metrics of the whole set. Predictions are written by each rank for its
part and joined by the main process in test-set order, atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mhe_scale.engine.ema import ExponentialMovingAverage
from mhe_scale.engine.model import Classifier
from mhe_scale.eval.distributed import evaluating, rank_and_world, test_batches
from mhe_scale.eval.xmc import XMCMetrics


def write_predictions(path: Path, lines: list[str], accelerator, rank: int, world: int) -> None:
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


def evaluate(model: Classifier, test_set: Dataset, ks: list[int], batch_size: int,
             inv_propensity: Tensor | None = None, desc: str = "eval",
             ema: ExponentialMovingAverage | None = None, accelerator=None,
             predictions_to: str | Path | None = None, prediction_k: int | None = None,
             written_ids: Tensor | None = None) -> dict[str, float]:
    """P@k, RP@k, nDCG@k (and PSP@k with propensities) of model.predict over test_set (EMA weights if given).

    With an accelerator of P processes, every process must call this and gets the metrics of the
    WHOLE set. `predictions_to`: also write the top-`prediction_k` (default max(ks)) predictions
    there, one line of 'id:score' pairs per test point in test-set order
    (data.xc_format.read_predictions), label y written as written_ids[y] when given (e.g. the
    file's id of a renumbered label).
    """
    from mhe_scale.data.xc_format import format_predictions

    k = max(max(ks), prediction_k or 0)
    lines: list[str] = []
    rank, world = rank_and_world(accelerator)
    metrics = XMCMetrics(ks=tuple(ks), inv_propensity=inv_propensity)
    with evaluating(model, accelerator, ema):
        for inputs, targets in test_batches(model, test_set, batch_size, accelerator, desc):
            scores, ids = model.predict(inputs, k)
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
        write_predictions(Path(predictions_to), lines, accelerator, rank, world)
    return metrics.compute()
