"""Multi-label metrics and per-class thresholds against sklearn and naive loops."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mhe_scale.eval.multilabel import average_precision, mean_average_precision, multilabel_report, threshold_metrics
from mhe_scale.eval.thresholds import load_thresholds, save_thresholds, tune_thresholds


def data(seed=0, n=60, c=7, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < 0.3
    s = np.clip(0.3 * y + rng.random((n, c)) * 0.8, 0, 1)
    if ties:
        s = np.round(s, 1)  # many equal scores
    return s, y


@pytest.mark.parametrize("ties", [False, True])
def test_ap_equals_sklearn(ties):
    s, y = data(1, ties=ties)
    y[:, 0] = False  # a class with no positive
    ap = average_precision(s, y)
    assert np.isnan(ap[0])
    for c in range(1, y.shape[1]):
        assert ap[c] == pytest.approx(average_precision_score(y[:, c], s[:, c]), abs=1e-12)
    mean_ap, kept = mean_average_precision(s, y)
    assert kept == y.shape[1] - 1 and mean_ap == pytest.approx(np.mean(ap[1:]))


def naive_threshold_metrics(s, y, t):
    n, c = s.shape
    t = np.broadcast_to(np.asarray(t, dtype=float), (c,))
    pred = [[s[i, j] >= t[j] for j in range(c)] for i in range(n)]
    ps, rs = [], []
    for j in range(c):
        if not y[:, j].any():
            continue
        tp = sum(pred[i][j] and y[i, j] for i in range(n))
        npred = sum(pred[i][j] for i in range(n))
        ps.append(tp / npred if npred else 0.0)
        rs.append(tp / y[:, j].sum())
    cp, cr = np.mean(ps), np.mean(rs)
    tp = sum(pred[i][j] and y[i, j] for i in range(n) for j in range(c))
    op, o_r = tp / sum(map(sum, pred)), tp / y.sum()
    pe, re, fe = [], [], []
    for i in range(n):
        p_set = {j for j in range(c) if pred[i][j]}
        t_set = {j for j in range(c) if y[i, j]}
        inter = len(p_set & t_set)
        if not p_set and not t_set:
            pe.append(1.0), re.append(1.0), fe.append(1.0)
            continue
        pe.append(inter / len(p_set) if p_set else 0.0)
        re.append(inter / len(t_set) if t_set else 0.0)
        fe.append(2 * inter / (len(p_set) + len(t_set)))
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": o_r,
            "OF1": 2 * op * o_r / (op + o_r), "P_example": np.mean(pe), "R_example": np.mean(re),
            "F1_example": np.mean(fe)}


@pytest.mark.parametrize("per_class", [False, True])
def test_threshold_metrics_equal_loops(per_class):
    s, y = data(2, n=30, c=5)
    y[:, 4] = False
    y[3] = False  # an image with no label
    t = np.linspace(0.3, 0.7, 5) if per_class else 0.5
    got, want = threshold_metrics(s, y, t), naive_threshold_metrics(s, y, t)
    assert got == pytest.approx(want, abs=1e-12)


def naive_best_f1(s, y):
    best = []
    for j in range(s.shape[1]):
        f1s = []
        for cand in sorted(set(s[:, j]), reverse=True):
            pred = s[:, j] >= cand
            tp = (pred & y[:, j]).sum()
            f1s.append(2 * tp / (pred.sum() + y[:, j].sum()) if y[:, j].any() else 0.0)
        best.append(max(f1s))
    return np.array(best)


@pytest.mark.parametrize("ties", [False, True])
def test_tuned_thresholds_reach_the_best_f1_per_class(ties, tmp_path):
    s, y = data(3, ties=ties)
    y[:, 2] = False  # P = R = 0 for every threshold: the default is kept
    t = tune_thresholds(s, y, default=0.5)
    assert t[2] == 0.5
    pred = s >= t
    f1 = 2 * (pred & y).sum(0) / (pred.sum(0) + y.sum(0))
    want = naive_best_f1(s, y)
    np.testing.assert_allclose(np.delete(f1, 2), np.delete(want, 2), rtol=1e-12)
    half = s >= 0.5
    f1_half = 2 * (half & y).sum(0) / (half.sum(0) + y.sum(0))
    assert (np.delete(f1, 2) >= np.delete(f1_half, 2) - 1e-12).all()
    report = multilabel_report(s, y, t)
    assert {"mAP", "CF1@0.5", "OF1@tuned", "F1_example@tuned"} <= set(report)
    path = save_thresholds(tmp_path / "thresholds.npy", t)
    np.testing.assert_allclose(load_thresholds(path, 7), t.astype(np.float32))
    with pytest.raises(ValueError, match=r"thresholds\.npy: expected float thresholds \[5\]"):
        load_thresholds(path, 5)
