"""Top-1 / top-k accuracy of a model's predict over a test set split across processes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from mhe_scale.eval.distributed import evaluating, test_batches


def topk_accuracy(model: nn.Module, test_set: Dataset, batch_size: int, num_classes: int, accelerator=None,
                  ema=None, desc: str = "eval") -> dict[str, float]:
    """{"top1", "top{k}"} in [0, 1], k = min(5, num_classes), of `model.predict(inputs, k) -> (scores,
    ids [B, k])` against class targets [B]. Every process scores its part; the counts are summed, so
    every process returns the numbers of the whole set."""
    k = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@k, images
    with evaluating(model, accelerator, ema):
        for inputs, targets in test_batches(model, test_set, batch_size, accelerator, desc):
            _, ids = model.predict(inputs, k)
            hit = ids.cpu() == targets.cpu().view(-1, 1)
            counts += torch.tensor([hit[:, :1].sum().item(), hit.sum().item(), len(targets)], dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
    total = max(counts[2].item(), 1.0)
    return {"top1": counts[0].item() / total, f"top{k}": counts[1].item() / total}
