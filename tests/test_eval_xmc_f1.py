"""micro_f1 and tune_micro_f1_threshold against a hand example and plain-Python loops."""

import math
import random

import pytest
import torch

from mhe_scale.eval import micro_f1, tune_micro_f1_threshold

# 2 points; row 0: y = {0, 2}, row 1: y = {5}; the -inf entry is padding (id -1)
HAND_IDS = torch.tensor([[2, 1, 0], [4, 5, -1]])
HAND_SCORES = torch.tensor([[0.9, 0.5, 0.2], [0.8, 0.4, -math.inf]])
HAND_TARGETS = torch.tensor([[0, 2], [5, -1]])


def test_hand_example():
    # t = 0.5: predicted {2, 1}, {4} -> TP 1, FP 2, FN 2
    assert micro_f1(HAND_IDS, HAND_SCORES, HAND_TARGETS, 0.5) == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    # t = 0.4: {2, 1}, {4, 5} -> TP 2, FP 2, FN 1
    assert micro_f1(HAND_IDS, HAND_SCORES, HAND_TARGETS, 0.4) == pytest.approx(
        {"precision": 1 / 2, "recall": 2 / 3, "f1": 4 / 7})
    # t = 0.2: everything -> TP 3, FP 2, FN 0
    assert micro_f1(HAND_IDS, HAND_SCORES, HAND_TARGETS, 0.2)["f1"] == pytest.approx(3 / 4)
    assert micro_f1(HAND_IDS, HAND_SCORES, HAND_TARGETS, 2.0) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    threshold, f1 = tune_micro_f1_threshold(HAND_IDS, HAND_SCORES, HAND_TARGETS)
    assert threshold == pytest.approx(0.2) and f1 == pytest.approx(3 / 4)
    # a true label outside the top K is a miss: label 7 of row 1 is never predicted
    wide = torch.tensor([[0, 2], [5, 7]])
    assert micro_f1(HAND_IDS, HAND_SCORES, wide, 0.2) == pytest.approx(
        {"precision": 3 / 5, "recall": 3 / 4, "f1": 6 / 9})


def naive_micro_f1(id_rows, score_rows, label_rows, threshold):
    tp = fp = fn = 0
    for ids, scores, labels in zip(id_rows, score_rows, label_rows):
        truth = {y for y in labels if y >= 0}
        chosen = set()
        seen = set()
        for i, s in zip(ids, scores):
            if i < 0 or i in seen:
                continue
            seen.add(i)  # a repeated id keeps the score of its first position
            if s >= threshold:
                chosen.add(i)
        tp += len(chosen & truth)
        fp += len(chosen - truth)
        fn += len(truth - chosen)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": p, "recall": r, "f1": f}


def random_case(seed, n=70, c=12, k=5):
    """Scores on a coarse grid (many ties), repeated ids, -1 holes, 0-4 labels, labels beyond the top K."""
    rnd = random.Random(seed)
    id_rows, score_rows, label_rows = [], [], []
    for _ in range(n):
        ids = [rnd.choice([-1] + list(range(c))) for _ in range(k)]
        scores = sorted((round(rnd.random(), 1) for _ in range(k)), reverse=True)
        id_rows.append(ids)
        score_rows.append(scores)
        labels = [rnd.randrange(c) for _ in range(rnd.choice([0, 1, 1, 2, 3, 4]))]
        label_rows.append(labels + [-1] * (4 - len(labels)))
    return id_rows, score_rows, label_rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_naive_loop_and_tuning_is_exact(seed):
    id_rows, score_rows, label_rows = random_case(seed)
    ids, targets = torch.tensor(id_rows), torch.tensor(label_rows)
    scores = torch.tensor(score_rows, dtype=torch.float64)
    for t in (-1.0, 0.0, 0.3, 0.55, 0.9, 1.0, 2.0):
        assert micro_f1(ids, scores, targets, t) == pytest.approx(
            naive_micro_f1(id_rows, score_rows, label_rows, t), abs=1e-12), t
    # brute force over every score seen (and +inf: predict nothing); ties -> the highest threshold
    candidates = sorted({s for row in score_rows for s in row} | {math.inf}, reverse=True)
    best_t, best_f = None, -1.0
    for t in candidates:
        f = naive_micro_f1(id_rows, score_rows, label_rows, t)["f1"]
        if f > best_f + 1e-15:
            best_t, best_f = t, f
    threshold, f1 = tune_micro_f1_threshold(ids, scores, targets)
    assert f1 == pytest.approx(best_f, abs=1e-12)
    assert threshold == best_t
    assert micro_f1(ids, scores, targets, threshold)["f1"] == f1  # the threshold reproduces its F1


def test_float32_scores_and_single_label_targets():
    id_rows, score_rows, _ = random_case(7, k=3)
    singles = [random.Random(i).randrange(12) for i in range(len(id_rows))]
    scores = torch.tensor(score_rows, dtype=torch.float32)  # as read from a predictions file
    threshold, f1 = tune_micro_f1_threshold(torch.tensor(id_rows), scores, torch.tensor(singles))
    as_read = [[float(s) for s in row] for row in scores.tolist()]
    assert f1 == pytest.approx(naive_micro_f1(id_rows, as_read, [[y] for y in singles], threshold)["f1"], abs=1e-12)
    assert f1 == max(naive_micro_f1(id_rows, as_read, [[y] for y in singles], t)["f1"]
                     for row in as_read for t in row)


def test_nothing_to_find_and_bad_input():
    ids, scores = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.1]])
    assert tune_micro_f1_threshold(ids, scores, torch.tensor([[3]])) == (math.inf, 0.0)  # no hit possible
    assert tune_micro_f1_threshold(ids, scores, torch.tensor([[-1]])) == (math.inf, 0.0)  # no true label
    with pytest.raises(ValueError, match="NaN"):
        micro_f1(ids, torch.tensor([[0.5, math.nan]]), torch.tensor([[1]]), 0.0)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        micro_f1(ids, scores[:, :1], torch.tensor([[1]]), 0.0)
    with pytest.raises(ValueError, match="N=1 rows"):
        tune_micro_f1_threshold(ids, scores, torch.tensor([[1], [2]]))
