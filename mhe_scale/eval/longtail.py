"""Long-tail evaluation: accuracy by shot group, tau-normalised classifiers, weighted kNN, features.

- Shot groups by training images per class (Liu et al. 2019): many > 100, medium 21..100, few <= 20
  (data/longtail.shot_groups). `shot_accuracy` pools the test images of each group's classes.
- tau-normalisation (Kang et al. 2020): w_c <- w_c / ||w_c||^tau, bias dropped; `tau_predictions`
  scores every tau of a grid from ONE matmul: logits_tau = (f W^T) / ||w||^tau.
- kNN (Wu et al. 2018): the k most cosine-similar training features vote with weight exp(s / T).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mhe_scale.eval.distributed import evaluating, rank_and_world, test_batches

GROUPS = ("many", "medium", "few")
TAUS = tuple(round(0.1 * i, 1) for i in range(11))


def shot_counts(predictions: Tensor, targets: Tensor, groups: Tensor) -> Tensor:
    """float64 [4, 2]: (correct, images) overall and per group (many, medium, few); groups int [C]."""
    hit = (predictions.view(-1).cpu() == targets.view(-1).cpu()).double()
    g = groups.cpu()[targets.view(-1).cpu()]
    out = torch.zeros(4, 2, dtype=torch.float64)
    out[0] = torch.stack([hit.sum(), torch.tensor(float(len(hit)), dtype=torch.float64)])
    for i in range(3):
        sel = g == i
        out[i + 1] = torch.stack([hit[sel].sum(), sel.sum().double()])
    return out


def shot_accuracy(counts: Tensor) -> dict[str, float]:
    """shot_counts (summed over batches / processes) -> {overall, many, medium, few} accuracies in [0, 1]
    (NaN for a group without test images)."""
    names = ("overall", *GROUPS)
    return {n: (c[0] / c[1]).item() if c[1] > 0 else float("nan") for n, c in zip(names, counts)}


def tau_predictions(features: Tensor, weight: Tensor, taus: Sequence[float] = TAUS) -> Tensor:
    """int64 [T, B]: argmax_c (f . w_c) / ||w_c||^tau for each tau; features [B, D], weight [C, D]."""
    logits = features.float() @ weight.float().t()  # [B, C]
    norms = weight.float().norm(dim=1).clamp_min(1e-12)  # [C]
    scale = norms.view(1, -1) ** -torch.tensor(list(taus), dtype=torch.float32, device=norms.device).view(-1, 1)
    return (logits.unsqueeze(0) * scale.unsqueeze(1)).argmax(dim=2)  # [T, B, C] -> [T, B]


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, features: Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk: int = 256) -> Tensor:
    """int64 [B]: weighted kNN class of each row of features [B, D] among train_features [N, D]
    (cosine similarity; votes exp(s / T) of the k nearest)."""
    bank = F.normalize(train_features.float(), dim=1)
    out = []
    for rows in F.normalize(features.float(), dim=1).split(chunk):
        sim, idx = (rows @ bank.t()).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(rows), num_classes, device=rows.device)
        votes.scatter_add_(1, train_labels.to(rows.device)[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int, accelerator=None,
                     desc: str = "features") -> tuple[Tensor, Tensor]:
    """(features [N, D], labels [N]) of the whole dataset in order, on every process (each scores its
    contiguous part, then the parts are all-gathered). encoder.forward_features in eval mode."""
    from mhe_scale.parallel.collectives import all_gather_no_grad, world_group

    feats, labels = [], []
    with evaluating(encoder, accelerator):
        for inputs, targets in test_batches(encoder, dataset, batch_size, accelerator, desc):
            feats.append(encoder.forward_features(inputs).float())
            labels.append(targets.long())
    f, y = torch.cat(feats), torch.cat(labels)
    _, world = rank_and_world(accelerator)
    if world > 1:
        group = world_group()
        f, y = all_gather_no_grad(f.contiguous(), group), all_gather_no_grad(y.contiguous(), group)
    return f, y
