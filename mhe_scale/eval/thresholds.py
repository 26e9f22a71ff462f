"""Per-class decision thresholds tuned for F1 on a held-out split, saved as `thresholds.npy`.

Tune on held-out images scored with the evaluation transform (never on augmented training images).
For class c the candidates are its distinct held-out scores s; predicting "positive when score >= s"
gives F1(s) = 2 tp / (2 tp + fp + fn); the best s (the highest one among equal F1s) is kept and the
threshold is placed halfway down to the next lower distinct score (so the held-out predictions are
those of s, with a margin). A class with no held-out positive has F1 = 0 for every threshold
(P = R = 0): it keeps `default`. thresholds.npy: float32 [C] in sorted-class order (the logits' order).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def tune_thresholds(scores: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """scores [N, C], targets [N, C] -> per-class argmax-F1 thresholds float64 [C] (vectorised over classes)."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    if scores.ndim != 2 or scores.shape != y.shape or len(scores) == 0:
        raise ValueError(f"tune_thresholds: scores and targets must both be [N >= 1, C], got {scores.shape} and {y.shape}")
    n, c = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable")
    s, t = np.take_along_axis(scores, order, 0), np.take_along_axis(y, order, 0)
    tp = np.cumsum(t, axis=0)
    positives = t.sum(0)
    cut = np.ones_like(t)  # a threshold may only fall between distinct scores
    cut[:-1] = s[1:] != s[:-1]
    f1 = np.where(cut, 2 * tp / (np.arange(1, n + 1)[:, None] + positives), -1.0)
    best = f1.argmax(0)  # first = highest threshold among equal F1s
    chosen = s[best, np.arange(c)]
    below = s[np.minimum(best + 1, n - 1), np.arange(c)]
    threshold = np.where(best + 1 < n, (chosen + below) / 2, chosen)
    return np.where(positives > 0, threshold, default)


def save_thresholds(path: str | os.PathLike, thresholds: np.ndarray) -> Path:
    """Write float32 [C] (sorted-class order) without pickle."""
    path = Path(path)
    np.save(path, np.asarray(thresholds, dtype=np.float32), allow_pickle=False)
    return path


def load_thresholds(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Read thresholds.npy; errors name the file and what was expected."""
    try:
        array = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read thresholds ({err})") from None
    if array.shape != (num_classes,) or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected float thresholds [{num_classes}] (one per class, sorted-class order), "
                         f"got {array.dtype} {list(array.shape)}")
    return array
