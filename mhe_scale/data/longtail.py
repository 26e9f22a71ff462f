"""Long-tailed training subsets (Kang et al. ICLR 2021; Cao et al. 2019; Liu et al. 2019).

Per-class counts:
- `power_counts(reference, a)`: n_c^(a/10) of reference counts n_c, rescaled so the mean stays the
  reference's mean, rounded to the nearest integer (>= 1): Kang et al.'s ImageNet LT0 ... LT series
  (a = 0 balanced, a = 10 the reference itself); `kang_counts` gives the table's rows (LT0: floor of the
  mean, as the paper's 115 per class).
- `exponential_counts(n_max, ratio, C)`: n_c = floor(n_max * ratio^(-c/(C-1))), class 0 the largest
  (Cao et al. 2019's CIFAR-LT with imbalance ratio `ratio`).
- `imagenet_lt_reference()`: a stand-in for ImageNet-LT's per-class counts. Liu et al. 2019 drew
  them from a Pareto distribution with power 6 (1,000 classes, max 1,280, min 5, 115,846 images);
  only the released list file fixes each count. The stand-in is the rank profile through the facts
  published about it: n(0) = 1280, n(999) = 5, 385 classes with > 100 images, 479 with 21..100,
  136 with <= 20, total 115,846 (log-linear between the group boundaries, a curved head whose
  exponent is solved for the total). Pass the real counts (`counts_from_labels` of
  ImageNet_LT_train.txt) to `power_counts` to use the paper's own reference.

Nested sampling: `nested_subsets` draws ONE seeded permutation of each class's images and gives
every subset the first n_c images of it, so for each class the smaller of two subsets is contained
in the larger: a more skewed subset reuses the previous subset's images wherever its count allows.
`balanced_holdout` takes a fixed number of images per class out first (a balanced validation split).
`ood_class_split` halves the classes (seeded) for the out-of-distribution protocol.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

IMAGENET_LT = dict(num_classes=1000, n_max=1280, n_min=5, total=115_846)
# (a, max, min, total) of Kang et al. 2021, Table 1: subsets LT0, LT2, ..., LT8 and LT (= ImageNet-LT)
KANG_TABLE = {"LT0": (0, 115, 115, 115_000), "LT2": (2, 204, 67, 115_885), "LT4": (4, 343, 37, 115_801),
              "LT6": (6, 553, 20, 115_836), "LT8": (8, 857, 10, 115_852), "LT": (10, 1280, 5, 115_846)}


# ImageNet-LT facts used for the stand-in reference: max / min images per class, total, and its
# shot groups (385 classes with > 100 images, 479 with 21..100, 136 with <= 20)
IMAGENET_LT_SHOTS = (385, 479, 136)


def _reference_profile(p: float) -> np.ndarray:
    cfg, (many, medium, _) = IMAGENET_LT, IMAGENET_LT_SHOTS
    ranks = np.arange(cfg["num_classes"], dtype=np.float64)
    # log-linear through the shot-group boundaries (100.5 at rank 384.5, 20.5 at rank 863.5) and the min
    knots = [many - 0.5, many + medium - 0.5, cfg["num_classes"] - 1]
    log_n = np.interp(ranks, knots, np.log([100.5, 20.5, cfg["n_min"]]))
    head = ranks < knots[0]  # head: log n falls from log n_max to log 100.5 as (1 - r/r_many)^p
    lo, hi = math.log(100.5), math.log(cfg["n_max"])
    log_n[head] = lo + (hi - lo) * (1.0 - ranks[head] / knots[0]) ** p
    return np.rint(np.exp(log_n))


def imagenet_lt_reference() -> np.ndarray:
    """int64 [1000], decreasing: max 1280, min 5, sum 115,846, shot groups 385 / 479 / 136 (a stand-in
    for ImageNet-LT's released counts; module docstring). The head curvature p is bisected for the sum."""
    lo, hi = 1.0, 100.0  # the sum falls as p grows
    for _ in range(100):
        mid = (lo + hi) / 2
        if _reference_profile(mid).sum() > IMAGENET_LT["total"]:
            lo = mid
        else:
            hi = mid
    counts = _reference_profile(hi).astype(np.int64)
    counts[1] += IMAGENET_LT["total"] - counts.sum()  # absorb the last rounding step (a few images)
    return counts


def power_counts(reference: Sequence[int] | np.ndarray, a: float, mean: float | None = None) -> np.ndarray:
    """round(s * n_c^(a/10)) with s so that the mean of the unrounded counts is `mean` (default the
    reference's mean); int64 [C], every count >= 1."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 1 or len(ref) == 0 or (ref <= 0).any():
        raise ValueError(f"reference counts must be a non-empty 1-D array of positive counts, got shape {ref.shape}")
    raw = ref ** (a / 10.0)
    target = ref.mean() if mean is None else float(mean)
    return np.maximum(np.rint(raw * target / raw.mean()), 1).astype(np.int64)


def kang_counts(reference: Sequence[int] | np.ndarray, name: str) -> np.ndarray:
    """Kang et al.'s subset `name` (a KANG_TABLE key) of reference counts -> int64 [C]: power_counts with
    the row's a, except LT0 (a = 0, balanced), which takes floor(mean) images per class: every class's
    mean-preserving count is the same 115.846, which rounds to 116, while the paper's table has 115 x 1000."""
    a = KANG_TABLE[name][0]
    if a == 0:
        ref = np.asarray(reference, dtype=np.float64)
        return np.full(len(ref), max(int(math.floor(ref.mean())), 1), dtype=np.int64)
    return power_counts(reference, a)


def exponential_counts(n_max: int, ratio: float, num_classes: int) -> np.ndarray:
    """Cao et al. 2019: floor(n_max * ratio^(-c/(C-1))) for c = 0..C-1; int64 [C]."""
    if ratio < 1 or num_classes < 2:
        raise ValueError(f"imbalance ratio must be >= 1 and num_classes >= 2, got {ratio} and {num_classes}")
    c = np.arange(num_classes, dtype=np.float64)
    return np.floor(n_max * ratio ** (-c / (num_classes - 1)) + 1e-9).astype(np.int64)


def reference_labels(list_path: str | os.PathLike) -> np.ndarray:
    """Labels int64 [N] of a `relative/path label` list (e.g. ImageNet_LT_train.txt) for reference counts; only
    the labels are read, the paths are neither opened nor resolved. Errors name LIST:line (binary files too)."""
    from mhe_scale.data.image_folder import read_list_lines

    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"reference counts {list_path} do not exist")
    lines = read_list_lines(list_path)
    if not lines:
        raise ValueError(f"{list_path}: no 'relative/path label' lines")
    return np.asarray([label for _, _, label in lines], dtype=np.int64)


def counts_from_labels(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Images per class int64 [C] of labels [N]."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes or 0)


def class_members(labels: np.ndarray, seed: int, num_classes: int | None = None) -> list[np.ndarray]:
    """Per class c < num_classes (default max label + 1), its sample indices in one seeded random
    order (the order every subset reads)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = []
    for c in range(num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)):
        idx = np.flatnonzero(labels == c)
        out.append(idx[np.random.default_rng([seed, c]).permutation(len(idx))])
    return out


def balanced_holdout(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out indices, remaining indices): `per_class` random images of every class held out."""
    members = class_members(labels, seed + 1_000_003)
    short = [c for c, m in enumerate(members) if len(m) <= per_class]
    if short:
        raise ValueError(f"class {short[0]} has {len(members[short[0]])} images, not more than the "
                         f"{per_class} the validation split takes; lower the validation count")
    held = np.sort(np.concatenate([m[:per_class] for m in members]))
    rest = np.sort(np.concatenate([m[per_class:] for m in members]))
    return held, rest


def nested_subsets(labels: np.ndarray, counts: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """name -> sorted sample indices holding counts[name][c] images of class c, all read from one
    seeded per-class order (so subsets are nested class by class). Raises when a class is short."""
    sizes = {len(n) for n in counts.values()}
    members = class_members(labels, seed, max(sizes) if sizes else None)
    out = {}
    for name, n in counts.items():
        if len(n) != len(members):
            raise ValueError(f"subset {name}: {len(n)} counts for {len(members)} classes")
        for c, (want, have) in enumerate(zip(n, members)):
            if want > len(have):
                raise ValueError(f"subset {name}: class {c} needs {int(want)} images but has {len(have)}")
        out[name] = np.sort(np.concatenate([m[:int(k)] for m, k in zip(members, n)]))
    return out


def ood_class_split(num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(seen, unseen) sorted class ids, each half of the classes (seen gets the extra one when odd)."""
    order = np.random.default_rng([seed, 11]).permutation(num_classes)
    half = (num_classes + 1) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def shot_groups(train_counts: np.ndarray, many: int = 100, few: int = 20) -> np.ndarray:
    """int64 [C]: 0 many (> many images), 1 medium (few < n <= many), 2 few (<= few)."""
    n = np.asarray(train_counts)
    return np.where(n > many, 0, np.where(n > few, 1, 2)).astype(np.int64)
