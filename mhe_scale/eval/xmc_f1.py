"""Micro-averaged precision, recall and F1 of thresholded XMC predictions, and the threshold that
maximises micro-F1 on a dev split (to be applied once to the test split).

Inputs as in eval/xmc.py: predicted ids [N, K] (best first, -1 = none), their scores [N, K] and
targets [N, L] padded with -1 (a [N] tensor is one label per row). Label l is predicted for row i
when it is among the row's K predictions with score >= t; a true label outside the top K is a
miss. Summed over all rows (micro average):

    TP = sum_i |P_i(t) & Y_i|,   FP = sum_i |P_i(t)| - TP,   FN = sum_i |Y_i| - TP
    precision = TP / (TP + FP),  recall = TP / (TP + FN),  F1 = 2 TP / (2 TP + FP + FN)

(each 0 where its denominator is 0). A repeated predicted id counts once, with the score of its
first (best) position; a repeated true label counts once. Only the order of the scores matters, so
any monotone transform of them (log-probabilities or probabilities) tunes the same prediction set;
the threshold is on the scores as given (the project's heads write log-probabilities).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mhe_scale.eval.xmc import distinct_sorted, first_occurrence, prediction_hits


def _entries(pred_ids: Tensor, pred_scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
    """-> (scores float64 [M] of the distinct real predictions, hit bool [M], number of true labels)."""
    if pred_ids.dim() != 2 or pred_scores.shape != pred_ids.shape:
        raise ValueError(f"pred_ids and pred_scores must both be [N, K]; got {tuple(pred_ids.shape)} "
                         f"and {tuple(pred_scores.shape)}")
    if targets.dim() not in (1, 2) or targets.shape[0] != pred_ids.shape[0]:
        raise ValueError(f"targets must be [N] or [N, L] with N={pred_ids.shape[0]} rows (padded with -1), "
                         f"got shape {tuple(targets.shape)}")
    pred = pred_ids.long()
    scores = pred_scores.double().to(pred.device)
    t, first = distinct_sorted(targets.to(pred.device))
    real = (pred >= 0) & first_occurrence(pred)
    nan = torch.isnan(scores) & real
    if bool(nan.any()):
        raise ValueError(f"row {int(nan.any(1).nonzero()[0])} (0-based) has a NaN score; "
                         f"every predicted id needs a number to threshold")
    return scores[real], prediction_hits(pred, t)[real], int(first.sum())


def _scores(tp: int, predicted: int, num_true: int) -> dict[str, float]:
    return {"precision": tp / predicted if predicted else 0.0,
            "recall": tp / num_true if num_true else 0.0,
            "f1": 2 * tp / (predicted + num_true) if predicted + num_true else 0.0}


@torch.no_grad()
def micro_f1(pred_ids: Tensor, pred_scores: Tensor, targets: Tensor, threshold: float) -> dict[str, float]:
    """Micro precision / recall / F1 predicting every top-K id with score >= threshold.

    pred_ids [N, K] (-1 = none), pred_scores [N, K], targets [N, L] padded with -1 (or [N]).
    Returns {"precision", "recall", "f1"} as fractions in [0, 1].
    """
    scores, hit, num_true = _entries(pred_ids, pred_scores, targets)
    keep = scores >= threshold
    return _scores(int((hit & keep).sum()), int(keep.sum()), num_true)


@torch.no_grad()
def tune_micro_f1_threshold(pred_ids: Tensor, pred_scores: Tensor, targets: Tensor) -> tuple[float, float]:
    """The threshold t maximising micro_f1(..., t)["f1"] on this (dev) split, exactly -> (t, F1).

    Every distinct score is a candidate (sorted once, descending; TP and the prediction count are
    running sums, so all candidates cost one pass). t is the lowest score still predicted, so
    `micro_f1(..., t)` reproduces the F1 returned; of equally good thresholds the highest is taken.
    With no true positive possible the result is (inf, 0.0): predict nothing.
    """
    scores, hit, num_true = _entries(pred_ids, pred_scores, targets)
    if scores.numel() == 0 or num_true == 0 or not bool(hit.any()):
        return float("inf"), 0.0
    order = scores.argsort(descending=True, stable=True)
    s = scores[order]
    tp = hit[order].double().cumsum(0)
    predicted = torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)
    last = torch.ones_like(s, dtype=torch.bool)  # the last entry of each run of equal scores
    last[:-1] = s[:-1] != s[1:]
    f1 = torch.where(last, 2 * tp / (predicted + num_true), -1.0)
    best = int(f1.argmax())  # first maximum: the highest threshold among ties
    return float(s[best]), float(f1[best])
