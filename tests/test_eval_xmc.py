import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mhe_scale.data.xc_format import write_xc_format
from mhe_scale.eval import XMCMetrics, format_table, inverse_propensity, label_counts, xmc_metrics
from mhe_scale.labels import pad_label_lists

from conftest import load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]

L2 = math.log2


# ---------------------------------------------------------------- hand-computed example
# 3 points, 6 labels, hand-picked inverse propensities w_l = l + 1 (w = [1, 2, 3, 4, 5, 6]).
#   row 0: y = {0, 2}    pred = [2, 1, 0]   hits [1, 0, 1]
#   row 1: y = {5}       pred = [4, 5, -1]  hits [0, 1, 0]
#   row 2: y = {1, 3, 4} pred = [3, 3, 4]   hits [1, 0, 1]  (the repeated 3 is a miss)
HAND_PRED = torch.tensor([[2, 1, 0], [4, 5, -1], [3, 3, 4]])
HAND_TARGETS = pad_label_lists([[0, 2], [5], [1, 3, 4]])
HAND_W = torch.arange(1, 7, dtype=torch.float64)
IDCG1, IDCG2, IDCG3 = 1.0, 1 + 1 / L2(3), 1 + 1 / L2(3) + 1 / L2(4)  # ideal DCG with 1, 2, 3 true labels
HAND_EXPECTED = {
    "P@1": (1 + 0 + 1) / 3,
    "P@3": (2 / 3 + 1 / 3 + 2 / 3) / 3,  # = 5/9
    "nDCG@1": (1 + 0 + 1) / 3,
    # DCG@3: row 0 1/log2(2) + 1/log2(4) = 1.5; row 1 1/log2(3); row 2 1 + 1/log2(4) = 1.5
    "nDCG@3": (1.5 / IDCG2 + (1 / L2(3)) / IDCG1 + 1.5 / IDCG3) / 3,
    # PSP@1: hit weights at rank 1: 3, 0, 4; best achievable: 3 (max w over {0,2}), 6, 5 -> 7 / 14
    "PSP@1": (3 + 0 + 4) / (3 + 6 + 5),
    # PSP@3: (1/3)(3+1), (1/3)6, (1/3)(4+5) over best (1/3)(3+1), (1/3)6, (1/3)(5+4+2) -> 19/21
    "PSP@3": (4 / 3 + 2 + 3) / (4 / 3 + 2 + 11 / 3),
    "PSnDCG@1": (3 + 0 + 4) / (3 + 6 + 5),  # IDCG@1 = 1 for every row
    # PSDCG@3 / IDCG@3 per row; ideal ranks the true labels by w: row0 [3,1], row1 [6], row2 [5,4,2]
    "PSnDCG@3": ((3 + 1 / L2(4)) / IDCG2 + (6 / L2(3)) / IDCG1 + (4 + 5 / L2(4)) / IDCG3)
    / ((3 + 1 / L2(3)) / IDCG2 + 6 / IDCG1 + (5 + 4 / L2(3) + 2 / L2(4)) / IDCG3),
    # RP@k = hits@k / min(k, |y|): RP@1 rows 1/1, 0/1, 1/1; RP@3 rows 2/2, 1/1, 2/3
    "RP@1": (1 + 0 + 1) / 3,
    "RP@3": (1 + 1 + 2 / 3) / 3,  # = 8/9
    "R@1": (1 / 2 + 0 + 1 / 3) / 3,  # = 5/18
    "R@3": (2 / 2 + 1 / 1 + 2 / 3) / 3,  # = 8/9
}


def test_hand_example():
    got = xmc_metrics(HAND_PRED, HAND_TARGETS, ks=(1, 3), inv_propensity=HAND_W)
    assert got.keys() == HAND_EXPECTED.keys()
    for key, want in HAND_EXPECTED.items():
        assert got[key] == pytest.approx(want, abs=1e-12), key
    assert got["P@3"] == pytest.approx(5 / 9) and got["PSP@3"] == pytest.approx(19 / 21)


def test_rows_without_labels_count_as_zero_unless_ignored():
    pred = torch.cat([HAND_PRED, torch.tensor([[0, 1, 2]])])
    targets = torch.cat([HAND_TARGETS, torch.full((1, 3), -1)])  # 4th row: no true labels
    got = xmc_metrics(pred, targets, ks=(1, 3), inv_propensity=HAND_W)
    for key in ("P@1", "P@3", "nDCG@3", "R@3"):
        assert got[key] == pytest.approx(HAND_EXPECTED[key] * 3 / 4), key  # mean over all 4 rows
    for key in ("PSP@3", "PSnDCG@3"):  # ratios of sums: an empty row adds 0 to both sides
        assert got[key] == pytest.approx(HAND_EXPECTED[key]), key
    kept = xmc_metrics(pred, targets, ks=(1, 3), inv_propensity=HAND_W, ignore_empty=True)
    for key, want in HAND_EXPECTED.items():
        assert kept[key] == pytest.approx(want), key


def test_unnormalised_ps_and_narrow_predictions():
    got = xmc_metrics(HAND_PRED[:, :2], HAND_TARGETS, ks=(1, 3), inv_propensity=HAND_W, unnormalised=True)
    # only 2 predictions per row: the third counts as missing; hits [1,0], [0,1], [1,0]
    assert got["P@3"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 3) / 3)
    assert got["uPSP@1"] == pytest.approx((3 + 0 + 4) / 3)
    assert got["uPSP@3"] == pytest.approx((3 / 3 + 6 / 3 + 4 / 3) / 3)
    assert got["uPSnDCG@1"] == pytest.approx((3 + 0 + 4) / 3)


def test_inverse_propensity_formula_and_label_counts():
    targets = pad_label_lists([[0, 2, 2], [2], [], [5, 0]])  # the repeated 2 in row 0 counts once
    counts = label_counts(targets, 7)
    assert counts.tolist() == [2, 0, 2, 0, 0, 1, 0]
    w = inverse_propensity(counts, num_points=100)
    c = (math.log(100) - 1) * (1.5 + 1) ** 0.55  # C = (ln N - 1)(B + 1)^A
    assert w[0].item() == pytest.approx(1 + c * (2 + 1.5) ** -0.55)
    assert w[1].item() == pytest.approx(1 + c * 1.5 ** -0.55)
    w2 = inverse_propensity(counts, num_points=50, a=0.6, b=2.6)
    assert w2[5].item() == pytest.approx(1 + (math.log(50) - 1) * 3.6 ** 0.6 * 3.6 ** -0.6)  # N_l = 1
    assert bool((w[1:] >= w[:1]).all())  # rarer labels weigh more
    with pytest.raises(ValueError, match="outside"):
        label_counts(targets, 5)


# ---------------------------------------------------------------- naive reference on random data
def naive_metrics(pred, targets, ks, w, ignore_empty=False):
    """Loop-per-row reference written straight from the definitions in mhe_scale/eval/xmc.py."""
    sums = {}
    rows = 0
    for p_row, t_row in zip(pred.tolist(), targets.tolist()):
        y = {t for t in t_row if t >= 0}
        if ignore_empty and not y:
            continue
        rows += 1
        seen, hits = set(), []
        for pid in p_row:
            hits.append(pid >= 0 and pid in y and pid not in seen)
            seen.add(pid)
        hits += [False] * (max(ks) - len(hits))
        best = sorted((w[t] for t in y), reverse=True)
        for k in ks:
            idcg = sum(1 / L2(j + 2) for j in range(min(k, len(y))))
            nh = sum(hits[:k])
            gain = [w[p_row[j]] if hits[j] else 0.0 for j in range(k)]
            terms = {
                "P": nh / k,
                "RP": nh / min(k, len(y)) if y else 0.0,
                "R": nh / len(y) if y else 0.0,
                "nDCG": sum(hits[j] / L2(j + 2) for j in range(k)) / idcg if y else 0.0,
                "PSPn": sum(gain) / k,
                "PSPd": sum(best[:k]) / k,
                "PSNn": sum(g / L2(j + 2) for j, g in enumerate(gain)) / idcg if y else 0.0,
                "PSNd": sum(b / L2(j + 2) for j, b in enumerate(best[:k])) / idcg if y else 0.0,
            }
            for name, v in terms.items():
                sums[(name, k)] = sums.get((name, k), 0.0) + v
    out = {}
    for name in ("P", "nDCG", "RP"):
        out.update({f"{name}@{k}": sums[(name, k)] / rows for k in ks})
    out.update({f"PSP@{k}": sums[("PSPn", k)] / sums[("PSPd", k)] for k in ks})
    out.update({f"PSnDCG@{k}": sums[("PSNn", k)] / sums[("PSNd", k)] for k in ks})
    out.update({f"R@{k}": sums[("R", k)] / rows for k in ks})
    return out


def random_case(seed, n=60, c=25, kmax=8, lmax=7):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.stack([torch.randperm(c, generator=gen)[:kmax] for _ in range(n)])
    pred[torch.rand(n, kmax, generator=gen) < 0.1] = -1  # missing predictions
    dup = torch.rand(n, generator=gen) < 0.2
    pred[dup, -1] = pred[dup, 0]  # some rows repeat their best id at the end
    lists = []
    for _ in range(n):
        size = int(torch.randint(0, lmax + 1, (1,), generator=gen))  # includes rows without labels
        lists.append(torch.randint(0, c, (size,), generator=gen).tolist())  # may repeat a label
    targets = pad_label_lists(lists)
    counts = torch.randint(0, 50, (c,), generator=gen)
    return pred, targets, inverse_propensity(counts, 500)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ignore_empty", [False, True])
def test_matches_naive_reference(seed, ignore_empty):
    pred, targets, w = random_case(seed)
    ks = (1, 2, 5, 8, 10)
    got = xmc_metrics(pred, targets, ks, w, ignore_empty=ignore_empty)
    want = naive_metrics(pred, targets, ks, w.tolist(), ignore_empty)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def naive_rprecision(pred_rows, label_rows, k, ignore_empty=False):
    """R-Precision@k by hand: for each row, distinct true labels among the first k distinct
    predictions, over min(k, number of true labels); rows without labels score 0 (or are skipped)."""
    total, rows = 0.0, 0
    for preds, labels in zip(pred_rows, label_rows):
        truth = set(x for x in labels if x != -1)
        if not truth and ignore_empty:
            continue
        rows += 1
        found = []
        for x in preds[:k]:
            if x != -1 and x in truth and x not in found:
                found.append(x)
        total += len(found) / min(k, len(truth)) if truth else 0.0
    return total / rows


@pytest.mark.parametrize("seed", [5, 6])
def test_rprecision_matches_naive_loop(seed):
    """Short label lists (0-3 labels, repeats), repeated predicted ids (ties in the ranking), -1 holes."""
    import random
    rnd = random.Random(seed)
    pred_rows, label_rows = [], []
    for _ in range(80):
        pred_rows.append([rnd.choice([-1, rnd.randrange(6), rnd.randrange(6)]) for _ in range(4)])
        label_rows.append([rnd.randrange(6) for _ in range(rnd.choice([0, 1, 1, 2, 3]))])
    width = max(len(r) for r in label_rows)
    padded = [r + [-1] * (width - len(r)) for r in label_rows]
    ks = (1, 2, 3, 6)  # k = 6 is wider than the 4 predictions
    for ignore_empty in (False, True):
        got = xmc_metrics(torch.tensor(pred_rows), torch.tensor(padded), ks, ignore_empty=ignore_empty)
        for k in ks:
            assert got[f"RP@{k}"] == pytest.approx(naive_rprecision(pred_rows, padded, k, ignore_empty), abs=1e-12)
    # split over two "ranks": the summed states give the same RP@k
    parts = [XMCMetrics(ks), XMCMetrics(ks)]
    parts[0].update(torch.tensor(pred_rows[:33]), torch.tensor(padded[:33]))
    parts[1].update(torch.tensor(pred_rows[33:]), torch.tensor(padded[33:]))
    total = XMCMetrics(ks)
    total.load_state(parts[0].state() + parts[1].state())
    assert total.compute()["RP@2"] == pytest.approx(naive_rprecision(pred_rows, padded, 2), abs=1e-12)


def test_single_label_targets_and_no_propensities():
    pred = torch.tensor([[1, 0], [2, 3], [0, 1]])
    got = xmc_metrics(pred, torch.tensor([1, 3, 2]), ks=(1, 2))
    assert got == pytest.approx({"P@1": 1 / 3, "P@2": 1 / 3, "nDCG@1": 1 / 3,
                                 "nDCG@2": (1 + 1 / L2(3)) / 3, "R@1": 1 / 3, "R@2": 2 / 3,
                                 "RP@1": 1 / 3, "RP@2": 2 / 3})  # one true label: RP@k = R@k


def test_accumulator_over_batches_equals_one_batch():
    pred, targets, w = random_case(3, n=90)
    ks = (1, 3, 5)
    whole = XMCMetrics(ks, w)
    whole.update(pred, targets)
    batched = XMCMetrics(ks, w)
    for lo, hi in [(0, 7), (7, 40), (40, 41), (41, 90)]:
        part = targets[lo:hi]
        width = max(1, int((part >= 0).sum(1).max()))
        batched.update(pred[lo:hi], part[:, :width])  # each batch padded to its own width
    assert batched.compute() == pytest.approx(whole.compute(), abs=1e-12)
    # what a distributed caller does: sum the states of the "ranks", load, compute
    ranks = [XMCMetrics(ks, w), XMCMetrics(ks, w)]
    ranks[0].update(pred[:50], targets[:50])
    ranks[1].update(pred[50:], targets[50:])
    total = XMCMetrics(ks, w)
    total.load_state(ranks[0].state() + ranks[1].state())
    assert total.compute() == pytest.approx(whole.compute(), abs=1e-12)
    whole.reset()
    with pytest.raises(ValueError, match="before any update"):
        whole.compute()


def test_input_errors_name_the_problem():
    m = XMCMetrics((1, 3), HAND_W)
    with pytest.raises(ValueError, match="label 9 .* outside"):
        m.update(torch.tensor([[9, 0, 1]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="N=3 rows"):
        m.update(HAND_PRED, HAND_TARGETS[:2])
    with pytest.raises(ValueError, match="ks must be"):
        XMCMetrics((0, 1))
    with pytest.raises(ValueError, match="same ks"):
        m.load_state(torch.zeros(3))


def test_format_table():
    table = format_table({"fc": {"P@1": 0.5, "P@3": 0.25}, "mhp": {"P@1": 0.123456, "R@1": 1.0}})
    assert table.splitlines() == [
        "| run | P@1 | P@3 | R@1 |",
        "|---|---:|---:|---:|",
        "| fc | 50.00 | 25.00 | - |",
        "| mhp | 12.35 | - | 100.00 |",
    ]
    assert "0.1235" in format_table({"x": {"P@1": 0.123456}}, percent=False, digits=4)


# ---------------------------------------------------------------- tools/eval_xmc.py
def _write_hand_files(tmp_path):
    feats = torch.zeros(3, 4)
    feats[:, 0] = 1.0
    write_xc_format(tmp_path / "test.txt", feats, HAND_TARGETS, num_labels=6)
    # training set of 4 points: label counts N_l = [2, 0, 1, 0, 0, 1]
    write_xc_format(tmp_path / "train.txt", torch.ones(4, 4), [[0, 2], [0], [5], []], num_labels=6)
    lines = [" ".join(f"{i}:{1 - 0.1 * j:.1f}" for j, i in enumerate(row) if i >= 0) for row in HAND_PRED.tolist()]
    (tmp_path / "pred.txt").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "pred.npz", ids=HAND_PRED.numpy())
    return tmp_path


def test_eval_tool_end_to_end(tmp_path):
    d = _write_hand_files(tmp_path)
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "eval_xmc.py"), "--pred", str(d / "pred.txt"), str(d / "pred.npz"),
           "--labels", str(d / "test.txt"), "--train-labels", str(d / "train.txt"), "--k", "1", "3", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    w = inverse_propensity(torch.tensor([2, 0, 1, 0, 0, 1]), 4)
    want = xmc_metrics(HAND_PRED, HAND_TARGETS, (1, 3), w)
    assert set(results) == {str(d / "pred.txt"), str(d / "pred.npz")}  # same stem: full paths name the rows
    for got in results.values():
        assert got == pytest.approx(want, abs=1e-12)
        assert got["P@3"] == pytest.approx(5 / 9)
    # the table form, in-process, with plain label files
    (d / "test_plain.txt").write_text("0,2\n5\n1,3,4\n")
    tool = load_tool("eval_xmc")
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "test_plain.txt"), "--k", "1", "3"]) == 0


def test_eval_tool_errors_name_file_and_line(tmp_path, capsys):
    d = _write_hand_files(tmp_path)
    tool = load_tool("eval_xmc")
    (d / "bad.txt").write_text("2:0.9 1:0.5\n4:0.9 5:zz\n3:1 4:0.5\n")
    assert tool.main(["--pred", str(d / "bad.txt"), "--labels", str(d / "test.txt")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt:2" in err and "'5:zz'" in err
    (d / "rising.txt").write_text("2:0.9 1:0.5\n4:0.1 5:0.5\n3:1\n")
    assert tool.main(["--pred", str(d / "rising.txt"), "--labels", str(d / "test.txt")]) == 2
    assert "rising.txt:2" in capsys.readouterr().err
    (d / "short.txt").write_text("2:0.9\n4:0.1\n")
    assert tool.main(["--pred", str(d / "short.txt"), "--labels", str(d / "test.txt")]) == 2
    assert "short.txt has 2 rows" in capsys.readouterr().err
    (d / "big.txt").write_text("2:0.9\n4:0.1\n7:1\n")
    assert tool.main(["--pred", str(d / "big.txt"), "--labels", str(d / "test.txt")]) == 2
    assert "big.txt: row 3" in capsys.readouterr().err
    bom = (d / "test.txt").read_bytes().decode("utf-8")  # an XC file saved with a byte-order mark
    (d / "bom.txt").write_bytes(bom.encode("utf-8-sig"))
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "bom.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pred"]["P@3"] == pytest.approx(5 / 9)
    (d / "nan.txt").write_text("2:0.9 1:0.5\n4:0.9 5:nan\n3:1 4:0.5\n")
    assert tool.main(["--pred", str(d / "nan.txt"), "--labels", str(d / "test.txt")]) == 2
    assert "nan.txt:2: a score is nan" in capsys.readouterr().err
    (d / "labels_bad.txt").write_text("0,2\n5,x\n1\n")
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "labels_bad.txt")]) == 2
    assert "labels_bad.txt:2" in capsys.readouterr().err


def test_eval_tool_micro_f1_tuned_on_dev_applied_to_test(tmp_path, capsys):
    d = _write_hand_files(tmp_path)  # pred.txt scores 1.0, 0.9, 0.8 along each row
    (d / "dev.txt").write_text("0\n1\n")
    # dev thresholds: 0.9 -> F1 2/3; 0.7 -> 1/2; 0.5 -> 2/5; 0.3 -> 2/3 (tie: the higher one is kept)
    (d / "dev_pred.txt").write_text("0:0.9 3:0.5\n2:0.7 1:0.3\n")
    tool = load_tool("eval_xmc")
    argv = ["--pred", str(d / "pred.txt"), "--labels", str(d / "test.txt"), "--k", "1", "3",
            "--dev-pred", str(d / "dev_pred.txt"), "--dev-labels", str(d / "dev.txt")]
    assert tool.main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)["pred"]
    assert captured.err == ""  # tuned on dev, and at t = 0.9 no row passes all 3 predictions
    assert got["micro-F1 threshold"] == pytest.approx(0.9) and got["dev micro-F1"] == pytest.approx(2 / 3)
    # test at t = 0.9: {2, 1}, {4, 5}, {3} (the repeated 3 once) -> TP 3 of 5 predicted, 6 true
    assert got["micro-P"] == pytest.approx(3 / 5) and got["micro-R"] == pytest.approx(1 / 2)
    assert got["micro-F1"] == pytest.approx(6 / 11)
    assert got["RP@3"] == pytest.approx(8 / 9) and got["P@3"] == pytest.approx(5 / 9)
    assert tool.main(argv) == 0  # the table prints the threshold and where it came from
    out = capsys.readouterr().out
    assert out.splitlines()[1].endswith("| micro-P | micro-R | micro-F1 |")
    assert "t = 0.9; tuned on " + str(d / "dev_pred.txt") in out and "54.55" in out
    # a fixed threshold: no tuning, no warning
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "test.txt"), "--threshold", "0.85",
                      "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["pred"]["micro-F1"] == pytest.approx(6 / 11) and not captured.err


def test_eval_tool_warns_when_micro_f1_is_tuned_on_the_scored_split(tmp_path, capsys):
    d = _write_hand_files(tmp_path)
    tool = load_tool("eval_xmc")
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "test.txt"), "--micro-f1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "split being scored" in captured.err and "--dev-pred" in captured.err
    # at t = 0.8 rows 0 and 2 pass all 3 of their predictions (row 1 holds 2): K may cap recall
    assert "in 67% of rows all 3 predictions pass" in captured.err
    # tuned on test itself: t = 1.0 -> F1 4/9, 0.9 -> 6/11, 0.8 -> all 7 distinct ids, TP 5 of 6 true: 10/13
    assert json.loads(captured.out)["pred"]["micro-F1"] == pytest.approx(10 / 13)
    assert tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "test.txt"),
                      "--dev-pred", str(d / "pred.txt"), "--dev-labels", str(d / "test.txt")]) == 0
    assert "are the scored files" in capsys.readouterr().err
    # a file of bare ids has no scores to threshold
    (d / "bare.txt").write_text("2 1 0\n4 5\n3 3 4\n")
    assert tool.main(["--pred", str(d / "bare.txt"), "--labels", str(d / "test.txt"), "--micro-f1"]) == 2
    err = capsys.readouterr().err
    assert "bare.txt: holds ids without scores" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as stop:
        tool.main(["--pred", str(d / "pred.txt"), "--labels", str(d / "test.txt"), "--dev-pred", str(d / "pred.txt")])
    assert stop.value.code == 2 and "--dev-labels go together" in capsys.readouterr().err


def test_eval_tool_array_files_and_their_refusals(tmp_path, capsys):
    from safetensors.numpy import save_file

    d = _write_hand_files(tmp_path)
    scores = np.where(HAND_PRED.numpy() >= 0, 1 - 0.1 * np.arange(3), -np.inf).astype(np.float32)
    np.savez(d / "scored.npz", ids=HAND_PRED.numpy(), scores=scores)
    save_file({"ids": HAND_PRED.numpy(), "scores": scores}, str(d / "scored.safetensors"))
    save_file({"ids": HAND_PRED.numpy(), "scores": scores}, str(d / "misnamed.npz"))  # told by content
    tool = load_tool("eval_xmc")
    want = None
    for name in ("pred.txt", "scored.npz", "scored.safetensors", "misnamed.npz"):
        assert tool.main(["--pred", str(d / name), "--labels", str(d / "test.txt"), "--threshold", "0.85",
                          "--json"]) == 0, name
        got = next(iter(json.loads(capsys.readouterr().out).values()))
        assert got["micro-F1"] == pytest.approx(6 / 11), name
        want = want or got
        assert got == pytest.approx(want), name
    good = (d / "scored.npz").read_bytes()
    (d / "truncated.npz").write_bytes(good[: len(good) // 2])
    np.savez(d / "objects.npz", ids=np.array([[1, None]], dtype=object))
    (d / "truncated.safetensors").write_bytes((d / "scored.safetensors").read_bytes()[:60])
    (d / "noise.npz").write_bytes(bytes(range(7, 107)))
    nan_scores = scores.copy()
    nan_scores[0, 1] = np.nan
    np.savez(d / "nan.npz", ids=HAND_PRED.numpy(), scores=nan_scores)
    np.savez(d / "noids.npz", labels=HAND_PRED.numpy())
    for name, says in [("truncated.npz", "cannot read it as npz"), ("objects.npz", "never loaded"),
                       ("truncated.safetensors", "cannot read it as safetensors"),
                       ("noise.npz", "neither an .npz (zip) nor a safetensors file"),
                       ("nan.npz", "row 0 (0-based) has a NaN score"), ("noids.npz", "no array 'ids'")]:
        assert tool.main(["--pred", str(d / name), "--labels", str(d / "test.txt")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"eval_xmc: error: {d / name}: ") and says in err, err
        assert len(err.strip().splitlines()) == 1, err
