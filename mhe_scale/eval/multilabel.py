"""Multi-label metrics over a whole split: scores [N, C] (probabilities), targets [N, C] (bool / {0, 1}).

- AP per class (non-interpolated): Σ_n (R_n − R_{n−1}) P_n over the distinct score thresholds taken
  from high to low (ties form one step, as sklearn.metrics.average_precision_score). A class with no
  positive in the split has AP = NaN and is left out of mAP (sklearn would return 0 for it and
  warn); `map_classes` says how many classes mAP averages.
- At thresholds t (a scalar or one per class; predicted positive: score >= t):
  per class (classes with >= 1 positive only, as mAP) precision_c = tp/(tp+fp) (0 when nothing is
  predicted), recall_c = tp/(tp+fn); CP, CR = their means, CF1 = 2 CP CR / (CP + CR);
  overall OP = Σtp/Σ(tp+fp), OR = Σtp/Σ(tp+fn), OF1 = 2 OP OR / (OP + OR);
  example-based P, R, F1 = means over images of tp/|pred|, tp/|true|, 2tp/(|pred|+|true|), where
  an empty set on both sides scores 1 and an empty set on one side scores 0.
All metrics are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class non-interpolated AP float64 [C] (NaN for classes with no positive); vectorised over classes."""
    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0
    if scores.ndim != 2 or scores.shape != y.shape:
        raise ValueError(f"average_precision: scores and targets must both be [N, C], got {scores.shape} and {y.shape}")
    n, c = scores.shape
    order = np.argsort(-scores, axis=0, kind="stable")
    s, t = np.take_along_axis(scores, order, 0), np.take_along_axis(y, order, 0)
    tp = np.cumsum(t, axis=0)
    last_of_tie = np.ones_like(t)
    last_of_tie[:-1] = s[1:] != s[:-1]
    # index of the end of each position's tie group: reversed running minimum of the group ends
    ends = np.where(last_of_tie, np.arange(n)[:, None], n)
    ends = np.minimum.accumulate(ends[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(tp, ends, 0) / (ends + 1)
    positives = t.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (t * precision_at_end).sum(0) / positives
    return np.where(positives > 0, ap, np.nan)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """(mAP over classes with >= 1 positive, how many such classes); (NaN, 0) when there are none."""
    ap = average_precision(scores, targets)
    kept = ~np.isnan(ap)
    return (float(ap[kept].mean()) if kept.any() else float("nan")), int(kept.sum())


def threshold_metrics(scores: np.ndarray, targets: np.ndarray, thresholds: float | np.ndarray = 0.5) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1, and example-based P, R, F1 at `thresholds` (module docstring)."""
    y = np.asarray(targets) > 0
    pred = np.asarray(scores) >= np.asarray(thresholds, dtype=np.float64)
    tp, npred, ntrue = (pred & y).sum(0), pred.sum(0), y.sum(0)
    seen = ntrue > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_c = np.where(npred > 0, tp / np.maximum(npred, 1), 0.0)
        recall_c = tp / np.maximum(ntrue, 1)
    cp = float(precision_c[seen].mean()) if seen.any() else 0.0
    cr = float(recall_c[seen].mean()) if seen.any() else 0.0
    op = float(tp.sum() / npred.sum()) if npred.sum() else 0.0
    o_r = float(tp.sum() / ntrue.sum()) if ntrue.sum() else 0.0
    tp_i, pred_i, true_i = (pred & y).sum(1), pred.sum(1), y.sum(1)
    both_empty = (pred_i == 0) & (true_i == 0)
    p_i = np.where(pred_i > 0, tp_i / np.maximum(pred_i, 1), both_empty.astype(np.float64))
    r_i = np.where(true_i > 0, tp_i / np.maximum(true_i, 1), both_empty.astype(np.float64))
    f_i = np.where(both_empty, 1.0, 2 * tp_i / np.maximum(pred_i + true_i, 1))
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": o_r, "OF1": _f1(op, o_r),
            "P_example": float(p_i.mean()), "R_example": float(r_i.mean()), "F1_example": float(f_i.mean())}


def multilabel_report(scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict[str, float]:
    """mAP (+ map_classes) and the threshold metrics at 0.5 (suffix '@0.5') and, when given, at the
    tuned per-class thresholds (suffix '@tuned')."""
    mean_ap, kept = mean_average_precision(scores, targets)
    out: dict[str, float] = {"mAP": mean_ap, "map_classes": float(kept)}
    out.update({f"{k}@0.5": v for k, v in threshold_metrics(scores, targets, 0.5).items()})
    if thresholds is not None:
        out.update({f"{k}@tuned": v for k, v in threshold_metrics(scores, targets, thresholds).items()})
    return out
