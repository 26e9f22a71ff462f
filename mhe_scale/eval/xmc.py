"""Extreme multi-label metrics: P@k, R-Precision@k, nDCG@k, PSP@k, PSnDCG@k and recall@k, vectorised.

Inputs everywhere: predicted ids [N, K] (global label ids, best first, -1 = no prediction) and
targets [N, L] (true label ids, padded with -1; a [N] tensor is read as one label per row).
For a row with true set y, hits h_j = 1 if the j-th prediction is in y (j = 1..K):

    P@k      = (1/k) sum_{j<=k} h_j
    RP@k     = sum_{j<=k} h_j / min(k, |y|)        (R-Precision@k: 1 when the top k hold as many
                                                    true labels as they can; = P@k when |y| >= k)
    R@k      = sum_{j<=k} h_j / |y|
    nDCG@k   = DCG@k / IDCG@k,  DCG@k = sum_{j<=k} h_j / log2(j+1),  IDCG@k = sum_{j<=min(k,|y|)} 1 / log2(j+1)

Propensity-scored metrics weight a hit on label l by its inverse propensity w_l = 1 / p_l
(`inverse_propensity`, Jain et al. 2016). As in the Extreme Classification Repository's own
evaluation code, they are normalised by the best achievable value, as a ratio of sums over rows:

    PSP@k    = sum_i (1/k) sum_{j<=k} h_ij w_(ij)          / sum_i (1/k) (top-k of w over y_i, summed)
    PSnDCG@k = sum_i PSDCG_i@k / IDCG_i@k                  / sum_i (ideal PSDCG_i@k) / IDCG_i@k
    (PSDCG@k = sum_{j<=k} h_j w_(j) / log2(j+1); the ideal ranks y_i by w, best first)

The unnormalised means (numerators / N) are reported as uPSP@k and uPSnDCG@k on request.

Conventions: rows with no true labels count as 0 in every metric and stay in the mean over all
N rows (the repository convention; `ignore_empty=True` drops them from the denominator instead).
A label repeated in a row's targets counts once; a repeated predicted id counts only at its first
position (later copies are misses), so no metric can exceed 1.

Micro-F1 at a threshold on the scores, and the threshold tuned on a dev split: eval/xmc_f1.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mhe_scale.labels.codec import check_label_range

_FAMILIES = ("P", "R", "nDCG", "PSP_num", "PSP_den", "PSnDCG_num", "PSnDCG_den", "RP")
_SENTINEL = torch.iinfo(torch.long).max  # stands in for padding in sorted target rows


def distinct_sorted(targets: Tensor) -> tuple[Tensor, Tensor]:
    """targets [N, L] (-1 pads) -> (rows sorted ascending with pads as SENTINEL [N, L],
    first-occurrence mask of real labels [N, L])."""
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)
    if targets.shape[1] == 0:
        targets = targets.new_full((targets.shape[0], 1), -1)
    t = targets.long().masked_fill(targets < 0, _SENTINEL).sort(dim=1).values
    first = t != _SENTINEL
    first[:, 1:] &= t[:, 1:] != t[:, :-1]
    return t.contiguous(), first


def first_occurrence(pred: Tensor) -> Tensor:
    """pred [N, K] -> bool [N, K]: True where an id appears for the first time along its row."""
    ids, order = pred.sort(dim=1, stable=True)  # stable: the earliest copy of an id sorts first
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ~torch.zeros_like(repeat).scatter(1, order, repeat)


def prediction_hits(pred: Tensor, sorted_targets: Tensor) -> Tensor:
    """pred [N, K] ids (-1 = none), sorted_targets [N, L] from `distinct_sorted` -> bool hits [N, K]:
    the prediction is a true label (binary search in the sorted row) at its first position in the row."""
    pos = torch.searchsorted(sorted_targets, pred).clamp(max=sorted_targets.shape[1] - 1)
    return (sorted_targets.gather(1, pos) == pred) & (pred >= 0) & first_occurrence(pred)


def label_counts(targets: Tensor, num_classes: int) -> Tensor:
    """Training frequency N_l of every label: targets [N, L] (-1 pads) -> LongTensor [num_classes]."""
    check_label_range(targets, num_classes, allow_pad=True)
    t, first = distinct_sorted(targets)
    return torch.bincount(t[first], minlength=num_classes)


def inverse_propensity(label_counts: Tensor, num_points: int, a: float = 0.55, b: float = 1.5) -> Tensor:
    """w_l = 1 / p_l = 1 + C (N_l + B)^(-A), C = (ln N - 1)(B + 1)^A (Jain et al. 2016).

    label_counts [C] training frequencies N_l; num_points N training points. Returns float64 [C].
    The paper's A, B: 0.55, 1.5 in general, 0.6, 2.6 for Amazon, 0.5, 0.4 for Wikipedia-LSHTC.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be the number of training points (>= 1), got {num_points}")
    c = (math.log(num_points) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (label_counts.double() + b).pow(-a)


class XMCMetrics:
    """Accumulates XMC metrics over batches; `compute()` gives means over every row seen.

    Args:
        ks: cut-offs k (each >= 1); predictions narrower than max(ks) are padded with -1.
        inv_propensity: w [C] from `inverse_propensity`; enables PSP@k and PSnDCG@k.
        ignore_empty: drop rows without true labels from the means (default: they count as 0).
        unnormalised: also report uPSP@k and uPSnDCG@k (propensity-scored means, not normalised).

    Only sums are kept (`state()` -> float64 [8 * len(ks) + 2]), so a distributed caller can
    all-reduce the state of every rank and `load_state` the total before `compute()`.
    """

    def __init__(self, ks: Sequence[int] = (1, 3, 5), inv_propensity: Tensor | None = None,
                 ignore_empty: bool = False, unnormalised: bool = False) -> None:
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be cut-offs >= 1, e.g. (1, 3, 5); got {ks}")
        if inv_propensity is not None and inv_propensity.dim() != 1:
            raise ValueError(f"inv_propensity must be [C], got shape {tuple(inv_propensity.shape)}")
        self.ks = ks
        self.inv_propensity = None if inv_propensity is None else inv_propensity.detach().double()
        self.ignore_empty = ignore_empty
        self.unnormalised = unnormalised
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(_FAMILIES), len(self.ks), dtype=torch.float64)
        self._rows = torch.zeros(2, dtype=torch.float64)  # [points, points without labels]

    def state(self) -> Tensor:
        """float64 [8 * len(ks) + 2]: every accumulated sum (safe to all-reduce with SUM)."""
        return torch.cat([self._sums.flatten(), self._rows])

    def load_state(self, state: Tensor) -> None:
        """Replace the sums by `state` (e.g. the all-reduced `state()` of every rank)."""
        want = self._sums.numel() + 2
        if state.shape != (want,):
            raise ValueError(f"state must be [{want}] for ks={self.ks}, got {tuple(state.shape)}; "
                             f"pass the state() of an XMCMetrics built with the same ks")
        state = state.detach().double().cpu()
        self._sums = state[:-2].reshape(self._sums.shape).clone()
        self._rows = state[-2:].clone()

    @torch.no_grad()
    def update(self, pred_ids: Tensor, targets: Tensor) -> None:
        """pred_ids [N, K] best first (-1 = none), targets [N, L] padded with -1 (or [N])."""
        if pred_ids.dim() != 2:
            raise ValueError(f"pred_ids must be [N, K] global label ids, got shape {tuple(pred_ids.shape)}")
        if targets.dim() not in (1, 2) or targets.shape[0] != pred_ids.shape[0]:
            raise ValueError(f"targets must be [N] or [N, L] with N={pred_ids.shape[0]} rows (padded with -1), "
                             f"got shape {tuple(targets.shape)}")
        w = self.inv_propensity
        if w is not None:
            check_label_range(pred_ids, w.numel(), allow_pad=True)
            check_label_range(targets, w.numel(), allow_pad=True)
            w = w.to(pred_ids.device)
        sums, num_empty = _batch_sums(pred_ids.long(), targets, self.ks, w)
        self._sums += sums.cpu()
        self._rows += torch.tensor([pred_ids.shape[0], num_empty], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        """{"P@1": ..., "nDCG@3": ..., "RP@3": ..., "PSP@5": ..., "R@5": ...} as fractions in [0, 1]."""
        points, empty = self._rows.tolist()
        rows = points - empty if self.ignore_empty else points
        if points == 0:
            raise ValueError("XMCMetrics.compute() before any update(): no rows were seen")
        s = dict(zip(_FAMILIES, self._sums))
        rows_t = torch.tensor(rows, dtype=torch.float64)
        out: dict[str, Tensor] = {"P": _ratio(s["P"], rows_t), "nDCG": _ratio(s["nDCG"], rows_t),
                                  "RP": _ratio(s["RP"], rows_t)}
        if self.inv_propensity is not None:
            out["PSP"] = _ratio(s["PSP_num"], s["PSP_den"])
            out["PSnDCG"] = _ratio(s["PSnDCG_num"], s["PSnDCG_den"])
            if self.unnormalised:
                out["uPSP"] = _ratio(s["PSP_num"], rows_t)
                out["uPSnDCG"] = _ratio(s["PSnDCG_num"], rows_t)
        out["R"] = _ratio(s["R"], rows_t)
        return {f"{name}@{k}": float(v[i]) for name, v in out.items() for i, k in enumerate(self.ks)}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den elementwise, 0 where den is 0 (nothing to score)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def xmc_metrics(pred_ids: Tensor, targets: Tensor, ks: Sequence[int] = (1, 3, 5),
                inv_propensity: Tensor | None = None, **options: bool) -> dict[str, float]:
    """One-shot form of `XMCMetrics(ks, inv_propensity, **options)` over a single batch."""
    metrics = XMCMetrics(ks, inv_propensity, **options)
    metrics.update(pred_ids, targets)
    return metrics.compute()


def _batch_sums(pred: Tensor, targets: Tensor, ks: tuple[int, ...], w: Tensor | None) -> tuple[Tensor, int]:
    """Sum over rows of every per-row term -> ([8, len(ks)] float64, number of rows without labels)."""
    n, kmax = pred.shape[0], max(ks)
    if pred.shape[1] < kmax:
        pred = torch.cat([pred, pred.new_full((n, kmax - pred.shape[1]), -1)], dim=1)
    pred = pred[:, :kmax].contiguous()
    dev = pred.device
    t, first = distinct_sorted(targets.to(dev))
    n_true = first.sum(1)  # [N] distinct true labels
    hitf = prediction_hits(pred, t).double()

    kt = torch.tensor(ks, device=dev)
    col = kt - 1
    kf = kt.double()
    disc = 1.0 / torch.log2(torch.arange(kmax, device=dev, dtype=torch.float64) + 2.0)  # 1/log2(j+1), j=1..K
    ideal = torch.minimum(kt, n_true.unsqueeze(1))  # [N, len(ks)] ideal hits min(k, |y|)
    idcg = disc.cumsum(0)[(ideal - 1).clamp(min=0)]  # > 0; rows without labels have DCG = 0 anyway
    hits = hitf.cumsum(1)[:, col]
    terms = torch.zeros(len(_FAMILIES), n, len(ks), dtype=torch.float64, device=dev)
    terms[0] = hits / kf
    terms[1] = hits / n_true.clamp(min=1).unsqueeze(1)
    terms[2] = (hitf * disc).cumsum(1)[:, col] / idcg
    terms[7] = hits / ideal.clamp(min=1)  # rows without labels: 0 hits -> 0
    if w is not None:
        gain = w[pred.clamp(min=0)] * hitf  # [N, K]
        true_w = torch.where(first, w[t.masked_fill(~first, 0)], torch.zeros((), dtype=w.dtype, device=dev))
        best = true_w.topk(min(kmax, t.shape[1]), dim=1).values
        best = torch.cat([best, best.new_zeros(n, kmax - best.shape[1])], dim=1)  # [N, K]
        terms[3] = gain.cumsum(1)[:, col] / kf
        terms[4] = best.cumsum(1)[:, col] / kf
        terms[5] = (gain * disc).cumsum(1)[:, col] / idcg
        terms[6] = (best * disc).cumsum(1)[:, col] / idcg
    return terms.sum(1), int((n_true == 0).sum())


def format_table(results: Mapping[str, Mapping[str, float]], percent: bool = True, digits: int = 2) -> str:
    """Markdown table, one row per run, one column per metric (union, first-seen order).

    Values are printed x100 (percent, as XMC papers report them) unless percent=False; a metric
    a run lacks prints as "-".
    """
    columns: list[str] = []
    for metrics in results.values():
        columns += [m for m in metrics if m not in columns]
    scale = 100.0 if percent else 1.0
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for run, metrics in results.items():
        cells = [f"{metrics[c] * scale:.{digits}f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
