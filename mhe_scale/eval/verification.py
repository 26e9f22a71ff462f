"""Face verification on image pairs: the 10-fold protocol of LFW, CFP-FP and AgeDB-30.

Embeddings: each image and its horizontal flip go through the model, the two embeddings are
summed and L2-normalised (images uint8 -> (x / 255 - 0.5) / 0.5). Pair i is (2i, 2i+1); its
distance is the squared L2 distance d_i = |e_2i - e_2i+1|^2 in [0, 4]; "same" is predicted when
d_i < threshold.

Accuracy: the P pairs are cut into K contiguous folds (the first P mod K folds one pair larger,
as an unshuffled K-fold split). For each fold the threshold on the grid (default 0, 0.01, ..,
3.99) with the most correct pairs on the other K-1 folds is chosen (the smallest on ties), and
the fold's accuracy at that threshold is its score; reported: mean and population std over folds.

TAR@FAR (VAL@FAR): per fold, the largest grid threshold (default step 0.001) whose false accept
rate on the other folds is <= far_target; TAR and FAR are then measured on the fold; reported:
mean +- std of TAR and mean FAR. (Insightface interpolates the threshold between grid points;
choosing the grid point keeps the FAR bound and can only lower TAR by less than one grid step.)
A fold without same (different) pairs gives TAR (FAR) nan.

Counting is vectorised over pairs and thresholds: distances are sorted per (fold, same/different)
group and every threshold is located with one searchsorted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.data.face_bin import FaceBin, read_face_bin

ACC_THRESHOLDS = torch.arange(400, dtype=torch.float64) / 100  # 0.00 .. 3.99
FAR_THRESHOLDS = torch.arange(4000, dtype=torch.float64) / 1000  # 0.000 .. 3.999


@dataclass(frozen=True)
class VerificationResult:
    """Fold means (accuracy, tar, far) in [0, 1]; per-fold values in the tensors [K]
    (fold_tar_threshold: the TAR@FAR threshold, -inf where no grid point met the FAR target)."""

    accuracy: float
    accuracy_std: float
    threshold: float
    tar: float
    tar_std: float
    far: float
    far_target: float
    fold_accuracy: Tensor
    fold_threshold: Tensor
    fold_tar_threshold: Tensor

    def summary(self) -> str:
        return (f"accuracy {100 * self.accuracy:.2f} +- {100 * self.accuracy_std:.2f} % "
                f"(threshold {self.threshold:.2f}), TAR {100 * self.tar:.2f} +- {100 * self.tar_std:.2f} % "
                f"@ FAR {self.far_target:g} (measured FAR {100 * self.far:.3f} %)")


def fold_ids(n: int, folds: int) -> Tensor:
    """Fold of each of n items, contiguous: LongTensor [n]; the first n % folds folds get one more."""
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= number of pairs, got folds={folds} for {n} pairs")
    sizes = torch.full((folds,), n // folds, dtype=torch.long)
    sizes[: n % folds] += 1
    return torch.repeat_interleave(torch.arange(folds), sizes)


def counts_below(values: Tensor, group: Tensor, num_groups: int, thresholds: Tensor) -> Tensor:
    """#{i : group_i = g, values_i < thresholds_t} -> LongTensor [num_groups, T], without a loop."""
    order = values.argsort(stable=True)
    order = order[group[order].argsort(stable=True)]  # by group, then by value
    sizes = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    g = group[order]
    padded = values.new_full((num_groups, max(int(sizes.max()), 1)), math.inf)
    padded[g, torch.arange(len(order)) - starts[g]] = values[order]
    query = thresholds.to(values.dtype).expand(num_groups, -1).contiguous()
    return torch.searchsorted(padded, query, side="left")


def verification_metrics(distances: Tensor, issame: Tensor, folds: int = 10, far_target: float = 1e-3,
                         thresholds: Tensor | None = None, far_thresholds: Tensor | None = None) -> VerificationResult:
    """distances [P] (smaller = more alike), issame bool [P] -> K-fold accuracy and TAR@FAR.

    thresholds / far_thresholds: ascending grids for accuracy / TAR (defaults: ACC_THRESHOLDS,
    FAR_THRESHOLDS, suited to squared L2 distances of unit vectors).
    """
    if distances.dim() != 1 or issame.shape != distances.shape:
        raise ValueError(f"distances and issame must both be [P], got {list(distances.shape)} and {list(issame.shape)}")
    d = distances.detach().double().cpu()
    if not bool(torch.isfinite(d).all()):
        raise ValueError("distances contain nan/inf: check the embeddings (a zero embedding cannot be normalised)")
    same = issame.detach().cpu().bool()
    thr = (ACC_THRESHOLDS if thresholds is None else thresholds).double().cpu()
    far_thr = (FAR_THRESHOLDS if far_thresholds is None else far_thresholds).double().cpu()
    for name, grid in (("thresholds", thr), ("far_thresholds", far_thr)):
        if grid.dim() != 1 or grid.numel() == 0 or bool((grid[1:] < grid[:-1]).any()):
            raise ValueError(f"{name} must be a non-empty ascending 1-D grid")
    fold = fold_ids(len(d), folds)
    group = 2 * fold + same.long()  # (fold, different=0 / same=1)
    n_group = torch.bincount(group, minlength=2 * folds).view(folds, 2)
    n_neg, n_pos = n_group[:, 0], n_group[:, 1]

    below = counts_below(d, group, 2 * folds, thr).view(folds, 2, -1)  # [K, 2, T]
    correct = below[:, 1] + (n_neg[:, None] - below[:, 0])  # true accepts + true rejects, [K, T]
    best = (correct.sum(0, keepdim=True) - correct).argmax(dim=1)  # on the other folds; first max
    fold_acc = correct.gather(1, best[:, None]).squeeze(1).double() / n_group.sum(1)

    below = counts_below(d, group, 2 * folds, far_thr).view(folds, 2, -1)
    fa_train = below[:, 0].sum(0, keepdim=True) - below[:, 0]  # false accepts on the other folds
    n_neg_train = (n_neg.sum() - n_neg).double()
    ok = fa_train.double() / n_neg_train[:, None] <= far_target  # a prefix of the grid (monotone)
    idx = ok.sum(1) - 1
    has = idx >= 0  # else no grid threshold meets the target: accept nothing
    tar = torch.where(has, below[:, 1].gather(1, idx.clamp(min=0)[:, None]).squeeze(1), 0).double() / n_pos
    far = torch.where(has, below[:, 0].gather(1, idx.clamp(min=0)[:, None]).squeeze(1), 0).double() / n_neg
    return VerificationResult(
        accuracy=float(fold_acc.mean()), accuracy_std=float(fold_acc.std(unbiased=False)),
        threshold=float(thr[best].mean()), tar=float(tar.mean()), tar_std=float(tar.std(unbiased=False)),
        far=float(far.mean()), far_target=far_target, fold_accuracy=fold_acc, fold_threshold=thr[best],
        fold_tar_threshold=torch.where(has, far_thr[idx.clamp(min=0)], -math.inf))


def pair_distances(embeddings: Tensor) -> Tensor:
    """L2-normalised embeddings [2P, D] (pair i = rows 2i, 2i+1) -> squared L2 distances [P]."""
    if embeddings.dim() != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be [2P, D] with pairs in consecutive rows, got {list(embeddings.shape)}")
    return (embeddings[0::2] - embeddings[1::2]).pow(2).sum(1)


@torch.no_grad()
def embed_images(model: nn.Module, images: Tensor | FaceBin, batch_size: int = 64, flip: bool = True,
                 size: int = 112, device: torch.device | str | None = None) -> Tensor:
    """uint8 [N, 3, S, S] images (or a FaceBin, decoded batch by batch) -> L2-normalised float32 [N, D].

    Each embedding is model(x) + model(flip(x)) (flip=True), then normalised; the model runs in
    eval mode on `device` (default: where its parameters are) and gets its mode back afterwards.
    """
    if isinstance(images, Tensor) and (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3):
        raise ValueError(f"embed_images expects uint8 images [N, 3, H, W] (0..255), got {images.dtype} "
                         f"{list(images.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = len(images.images) if isinstance(images, FaceBin) else images.shape[0]
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch = images.decode(start, stop, size) if isinstance(images, FaceBin) else images[start:stop]
            x = (batch.to(device).float() / 255.0 - 0.5) / 0.5
            if flip:
                both = model(torch.cat([x, x.flip(3)]))
                emb = both[: len(x)] + both[len(x):]
            else:
                emb = model(x)
            out.append(F.normalize(emb.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate_bin(model: nn.Module, path: str | os.PathLike, batch_size: int = 64, folds: int = 10,
                 far_target: float = 1e-3, size: int = 112,
                 device: torch.device | str | None = None) -> VerificationResult:
    """The standard protocol on one insightface .bin pair file (read with the restricted unpickler)."""
    pairs = read_face_bin(path)
    embeddings = embed_images(model, pairs, batch_size, True, size, device)
    return verification_metrics(pair_distances(embeddings), pairs.issame, folds, far_target)
