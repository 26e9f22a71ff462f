"""Face verification on image pairs: the 10-fold protocol of LFW, CFP-FP and AgeDB-30.

Embeddings: each image and its horizontal flip go through the model, the two embeddings are
summed and L2-normalised (images uint8 -> (x / 255 - 0.5) / 0.5). Pair i is (2i, 2i+1); its
distance is the squared L2 distance d_i = |e_2i - e_2i+1|^2 in [0, 4]; "same" is predicted when
d_i < threshold.

Accuracy: the P pairs are cut into K contiguous folds (the first P mod K folds one pair larger,
as an unshuffled K-fold split). For each fold the threshold with the most correct pairs on the
other K-1 folds is chosen (the smallest on ties), and the fold's accuracy at that threshold is its
score; reported: mean and population std over folds.

Thresholds (default, thresholds=None): taken from the data, per fold: the midpoints of the sorted
distinct distances of the training folds, plus one below and one above them all, so every way the
training distances can be split is tried whatever their scale. insightface's fixed grid (0, 0.01,
.., 3.99: ACC_THRESHOLDS) is available as thresholds=ACC_THRESHOLDS; on a trained model the two
agree to a few hundredths of a percent, but a collapsed model whose distances all fall between two
grid points reads 50 % on the grid: that case is warned about.

TAR@FAR (VAL@FAR): per fold, the largest threshold (data-driven as above, or the far_thresholds
grid, e.g. FAR_THRESHOLDS of step 0.001) whose false accept rate on the other folds is <=
far_target; TAR and FAR are then measured on the fold; reported: mean +- std of TAR and mean FAR.
(insightface interpolates the threshold between grid points; a threshold at or below every
training distance keeps the FAR bound and accepts nothing on the training folds.) A FAR target
below 1 / (impostor pairs of the training folds) cannot be resolved: the threshold then only
admits no training impostor (see VerificationResult.impostors). Without impostor pairs TAR@FAR is
undefined: nan, with a warning. A fold without same (different) test pairs gives TAR (FAR) nan.

Counting is vectorised over pairs and thresholds (sort + searchsorted); the only loop is over
the K folds.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mhe_scale.data.face_bin import FaceBin, read_face_bin

ACC_THRESHOLDS = torch.arange(400, dtype=torch.float64) / 100  # 0.00 .. 3.99, insightface's grid
FAR_THRESHOLDS = torch.arange(4000, dtype=torch.float64) / 1000  # 0.000 .. 3.999


def far_resolvable(impostors: float, far: float) -> bool:
    """True when `impostors` negative pairs (those a threshold is chosen on; a fraction of the file's
    under K folds) can measure a false accept rate of `far`: impostors * far >= 1. Below that the
    threshold can only admit no impostor, and TAR@FAR is not a measurement (tools print n/a)."""
    return impostors > 0 and impostors * far >= 1


@dataclass(frozen=True)
class VerificationResult:
    """Fold means (accuracy, tar, far) in [0, 1]; per-fold values in the tensors [K]
    (fold_tar_threshold: the TAR@FAR threshold, -inf where no threshold met the FAR target, nan
    where the training folds hold no impostor pair); genuine / impostors: same / different pairs."""

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
    genuine: int = 0
    impostors: int = 0

    @property
    def far_resolved(self) -> bool:
        """True when the training folds hold enough impostor pairs (>= 1 / far_target) to measure far_target."""
        return far_resolvable(self.impostors * (1 - 1 / len(self.fold_accuracy)), self.far_target)

    def summary(self) -> str:
        acc = (f"accuracy {100 * self.accuracy:.2f} +- {100 * self.accuracy_std:.2f} % "
               f"(threshold {self.threshold:.4g})")
        if math.isnan(self.tar):
            return f"{acc}, TAR @ FAR {self.far_target:g} n/a ({self.impostors} impostor pairs)"
        return (f"{acc}, TAR {100 * self.tar:.2f} +- {100 * self.tar_std:.2f} % @ FAR {self.far_target:g} "
                f"(measured FAR {100 * self.far:.3f} %)")


def fold_ids(n: int, folds: int) -> Tensor:
    """Fold of each of n items, contiguous: LongTensor [n]; the first n % folds folds get one more."""
    if not 2 <= folds <= n:
        raise ValueError(f"need 2 <= folds <= number of pairs, got folds={folds} for {n} pairs")
    sizes = torch.full((folds,), n // folds, dtype=torch.long)
    sizes[: n % folds] += 1
    return torch.repeat_interleave(torch.arange(folds), sizes)


def data_thresholds(distances: Tensor) -> Tensor:
    """Candidate thresholds for `d < t` from distances [n] (float64) -> ascending [U + 1]: the smallest
    distance (accepts none), the midpoints of consecutive distinct distances, and the next float
    above the largest (accepts all); each split of the distances is reached exactly once."""
    u = torch.unique(distances)  # sorted
    mid = (u[1:] + u[:-1]) / 2
    mid = torch.where(mid > u[:-1], mid, u[1:])  # adjacent floats: the midpoint may round down
    top = torch.nextafter(u[-1:], torch.full_like(u[-1:], math.inf))
    return torch.cat([u[:1], mid, top])


def _below(sorted_values: Tensor, thresholds: Tensor) -> Tensor:
    """#{v < t} for each threshold [T] -> LongTensor [T]; sorted_values ascending."""
    return torch.searchsorted(sorted_values, thresholds, side="left")


def _rate(count: Tensor | int, n: int) -> float:
    return float(count) / n if n else math.nan


def _check_grid(name: str, grid: Tensor, d: Tensor, what: str) -> None:
    if grid.dim() != 1 or grid.numel() == 0 or bool((grid[1:] < grid[:-1]).any()):
        raise ValueError(f"{name} must be a non-empty ascending 1-D grid")
    cells = torch.bucketize(d, grid, right=True)  # grid cell of each distance
    if len(d) > 1 and bool((cells == cells[0]).all()) and not bool((d == d[0]).all()):
        warnings.warn(f"{what}: all {len(d)} distances lie in [{float(d.min()):.3g}, {float(d.max()):.3g}], between "
                      f"two points of the {name} grid, which cannot split them: accuracy is that of accepting all or "
                      f"none (50 % on balanced pairs); use data-driven thresholds ({name}=None)", stacklevel=3)


def verification_metrics(distances: Tensor, issame: Tensor, folds: int = 10, far_target: float = 1e-3,
                         thresholds: Tensor | None = None, far_thresholds: Tensor | None = None,
                         name: str = "verification pairs") -> VerificationResult:
    """distances [P] (smaller = more alike), issame bool [P] -> K-fold accuracy and TAR@FAR.

    thresholds / far_thresholds: None (default) takes them from the training folds' distances
    (data_thresholds); or ascending grids, e.g. ACC_THRESHOLDS / FAR_THRESHOLDS (insightface's).
    name appears in warnings (e.g. the .bin path).
    """
    if distances.dim() != 1 or issame.shape != distances.shape:
        raise ValueError(f"distances and issame must both be [P], got {list(distances.shape)} and {list(issame.shape)}")
    d = distances.detach().double().cpu()
    if not bool(torch.isfinite(d).all()):
        raise ValueError("distances contain nan/inf: check the embeddings (a zero embedding cannot be normalised)")
    same = issame.detach().cpu().bool()
    fold = fold_ids(len(d), folds)
    grids = {}
    for key, grid in (("thresholds", thresholds), ("far_thresholds", far_thresholds)):
        if grid is not None:
            grids[key] = grid.double().cpu()
            _check_grid(key, grids[key], d, name)
    if bool((d == d[0]).all()):
        warnings.warn(f"{name}: all {len(d)} distances are equal ({float(d[0]):.3g}): the model maps every image "
                      f"to the same embedding, so no threshold separates any pair", stacklevel=2)
    genuine, impostors = int(same.sum()), int((~same).sum())
    if impostors == 0:
        warnings.warn(f"{name}: no impostor (different-identity) pairs among {len(d)} pairs: TAR@FAR is undefined "
                      f"and reported as nan, and accuracy only counts genuine pairs", stacklevel=2)
    acc, thr_acc, tar, far, thr_tar = [], [], [], [], []
    for k in range(folds):
        test = fold == k
        tr_d, tr_s = d[~test], same[~test]
        tr_pos, tr_neg = tr_d[tr_s].sort().values, tr_d[~tr_s].sort().values
        te_pos, te_neg = d[test & same].sort().values, d[test & ~same].sort().values
        cand = grids["thresholds"] if "thresholds" in grids else data_thresholds(tr_d)
        correct = _below(tr_pos, cand) + (len(tr_neg) - _below(tr_neg, cand))  # true accepts + true rejects
        t = cand[int(correct.argmax()):][:1]  # first max: the smallest best threshold
        acc.append(float(_below(te_pos, t) + (len(te_neg) - _below(te_neg, t))) / int(test.sum()))
        thr_acc.append(float(t))
        if not len(tr_neg):  # no impostors to set a FAR by
            tar.append(math.nan), far.append(math.nan), thr_tar.append(math.nan)
            continue
        far_cand = grids["far_thresholds"] if "far_thresholds" in grids else cand
        ok = _below(tr_neg, far_cand).double() / len(tr_neg) <= far_target  # a prefix (monotone in t)
        idx = int(ok.sum()) - 1
        if idx < 0:  # no threshold meets the target: accept nothing
            tar.append(_rate(0, len(te_pos))), far.append(_rate(0, len(te_neg))), thr_tar.append(-math.inf)
            continue
        ft = far_cand[idx:idx + 1]
        tar.append(_rate(_below(te_pos, ft), len(te_pos)))
        far.append(_rate(_below(te_neg, ft), len(te_neg)))
        thr_tar.append(float(ft))
    fold_acc, fold_tar, fold_far = (torch.tensor(v, dtype=torch.float64) for v in (acc, tar, far))
    fold_thr = torch.tensor(thr_acc, dtype=torch.float64)
    return VerificationResult(
        accuracy=float(fold_acc.mean()), accuracy_std=float(fold_acc.std(unbiased=False)),
        threshold=float(fold_thr.mean()), tar=float(fold_tar.mean()), tar_std=float(fold_tar.std(unbiased=False)),
        far=float(fold_far.mean()), far_target=far_target, fold_accuracy=fold_acc, fold_threshold=fold_thr,
        fold_tar_threshold=torch.tensor(thr_tar, dtype=torch.float64), genuine=genuine, impostors=impostors)


def pair_distances(embeddings: Tensor) -> Tensor:
    """L2-normalised embeddings [2P, D] (pair i = rows 2i, 2i+1) -> squared L2 distances [P]."""
    if embeddings.dim() != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be [2P, D] with pairs in consecutive rows, got {list(embeddings.shape)}")
    return (embeddings[0::2] - embeddings[1::2]).pow(2).sum(1)


@torch.no_grad()
def embed_images(model: nn.Module, images: Tensor | FaceBin, batch_size: int = 64, flip: bool = True,
                 size: int = 112, device: torch.device | str | None = None, progress: str | None = None) -> Tensor:
    """uint8 [N, 3, S, S] images (or a FaceBin, decoded batch by batch) -> L2-normalised float32 [N, D].

    Each embedding is model(x) + model(flip(x)) (flip=True; two forwards of at most batch_size images),
    then normalised; the model runs in eval mode on `device` (default: where its parameters are) and
    gets its mode back afterwards. progress: a tqdm bar over the images with this label (None: none).
    """
    if isinstance(images, Tensor) and (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3):
        raise ValueError(f"embed_images expects uint8 images [N, 3, H, W] (0..255), got {images.dtype} "
                         f"{list(images.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = len(images.images) if isinstance(images, FaceBin) else images.shape[0]
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=total, desc=progress, unit="img", mininterval=2.0, leave=False, disable=progress is None)
    try:
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch = images.decode(start, stop, size) if isinstance(images, FaceBin) else images[start:stop]
            x = (batch.to(device).float() / 255.0 - 0.5) / 0.5
            emb = model(x)
            if flip:  # a second forward, not one of [2b] images: the pass's activations stay those of b images
                emb = emb + model(x.flip(3))
            out.append(F.normalize(emb.float(), dim=1).cpu())
            bar.update(stop - start)
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)


def bin_distances(model: nn.Module, path: str | os.PathLike, batch_size: int = 64, size: int = 112,
                  device: torch.device | str | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """One insightface .bin pair file (read with the restricted unpickler) -> (distances [P], issame bool [P]);
    progress: a bar "verify <file name>" over its images."""
    pairs = read_face_bin(path)
    label = f"verify {Path(str(path)).name}" if progress else None
    embeddings = embed_images(model, pairs, batch_size, True, size, device, progress=label)
    return pair_distances(embeddings), pairs.issame


def evaluate_bin(model: nn.Module, path: str | os.PathLike, batch_size: int = 64, folds: int = 10,
                 far_target: float = 1e-3, size: int = 112,
                 device: torch.device | str | None = None) -> VerificationResult:
    """The standard protocol on one insightface .bin pair file (read with the restricted unpickler)."""
    distances, issame = bin_distances(model, path, batch_size, size, device)
    return verification_metrics(distances, issame, folds, far_target, name=str(path))
