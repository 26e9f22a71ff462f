"""Score XMC predictions against true labels; prints a markdown table (one row per prediction file).

    python tools/eval_xmc.py --pred run_a.txt run_b.npz --labels test.txt --train-labels train.txt --k 1 3 5

Prediction files, one row per test point, in the order of --labels (an XMC run writes one per head
with eval.prediction_k=K: <output_dir>/<head>/predictions.txt, in the data files' label ids; for
a raw-text corpus, the ids of the run's label_map.json):
  text  one line per point: space-separated 'id:score' pairs, best first (scores must not increase
        along a line); bare ids without scores are accepted too; an empty line = no prediction.
  .npz  array `ids` [N, K] of integer label ids (-1 = none), best first, and optionally `scores`
        [N, K] (then checked to be non-increasing along each row).
Label files (--labels, --train-labels): Extreme Classification Repository format (header 'N F L',
then 'l1,l2 f:v ...'), or plain text with one line of comma-separated label ids per point.
Propensity-scored metrics (PSP@k, PSnDCG@k) need --train-labels; values print in percent.
Metric definitions and conventions: mhe_scale/eval/xmc.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mhe_scale.data.xc_format import read_label_lists, read_predictions, read_xc_format
from mhe_scale.eval import XMCMetrics, format_table, inverse_propensity, label_counts

CHUNK = 8192  # rows per update: bounds memory on large test sets


def load_labels(path: Path, fmt: str) -> tuple[Tensor, int | None, int]:
    """-> (targets [N, L] padded with -1, label count from the XC header or None, line of point 0)."""
    if fmt == "auto":
        with open(path, "rb") as f:  # a leading byte-order mark is dropped; the readers report bad bytes
            first = f.readline().decode("utf-8-sig", errors="replace").split()
        fmt = "xc" if len(first) == 3 and all(t.isdigit() for t in first) else "plain"
    if fmt == "xc":
        data = read_xc_format(path, features=False)
        return data.labels, data.num_labels, 2
    return read_label_lists(path), None, 1


def check_labels(targets: Tensor, num_labels: int, path: Path, first_line: int) -> None:
    bad = targets >= num_labels
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"{path}:{row + first_line}: label {int(targets[bad][0])} is outside [0, {num_labels}); "
                         f"pass the right --num-labels or fix the file")


def load_predictions(path: Path) -> Tensor:
    """-> predicted ids [N, K], best first, -1 = none."""
    if path.suffix != ".npz":
        return read_predictions(path)[0]
    with np.load(path) as z:
        if "ids" not in z:
            raise ValueError(f"{path}: no array 'ids'; save predictions with np.savez(path, ids=..., scores=...)")
        ids, scores = z["ids"], z["scores"] if "scores" in z else None
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'ids' must be an integer array [N, K], got {ids.dtype} {ids.shape}")
    if scores is not None:
        if scores.shape != ids.shape:
            raise ValueError(f"{path}: 'scores' {scores.shape} must match 'ids' {ids.shape}")
        rising = (scores[:, 1:] > scores[:, :-1]) & (ids[:, 1:] >= 0)
        if rising.any():
            raise ValueError(f"{path}: row {int(rising.any(1).argmax())} (0-based) has scores increasing "
                             f"along it; store each row best first (sort by score, descending)")
    if (ids < -1).any():
        raise ValueError(f"{path}: row {int((ids < -1).any(1).argmax())} (0-based) holds an id below -1; "
                         f"use -1 for a missing prediction")
    return torch.from_numpy(ids.astype(np.int64))


def check_rows(pred: Tensor, path: Path, num_points: int, num_labels: int, labels_path: Path) -> None:
    if pred.shape[0] != num_points:
        raise ValueError(f"{path} has {pred.shape[0]} rows but {labels_path} has {num_points} points; "
                         f"write one prediction line per test point, in the same order")
    bad = pred >= num_labels
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"{path}: row {row + 1} (line {row + 1} of a text file) predicts label "
                         f"{int(pred[bad][0])}, outside [0, {num_labels}); pass --num-labels or fix the ids")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, nargs="+", required=True, help="prediction files (text or .npz)")
    p.add_argument("--labels", type=Path, required=True, help="true labels of the test points")
    p.add_argument("--train-labels", type=Path, help="training labels, for propensities (PSP@k, PSnDCG@k)")
    p.add_argument("--labels-format", choices=("auto", "xc", "plain"), default="auto")
    p.add_argument("--num-labels", type=int, help="label count C when no XC header gives it")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--a", type=float, default=0.55, help="propensity A (Jain et al. 2016)")
    p.add_argument("--b", type=float, default=1.5, help="propensity B")
    p.add_argument("--names", nargs="+", help="run names for the table rows (default: file stems)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    try:
        targets, header_labels, first_line = load_labels(args.labels, args.labels_format)
        train = None
        if args.train_labels is not None:
            train, train_header, train_first = load_labels(args.train_labels, args.labels_format)
            header_labels = max(header_labels or 0, train_header or 0) or None
        preds = [load_predictions(path) for path in args.pred]
        names = args.names or [path.stem for path in args.pred]
        if len(set(names)) < len(names) and not args.names:
            names = [str(path) for path in args.pred]
        if len(set(names)) != len(preds):
            raise ValueError(f"--names must give {len(preds)} distinct names, one per --pred file; got {names}")
        num_labels = args.num_labels or header_labels or 1 + max(
            [int(targets.max())] + [int(x.max()) for x in preds] + ([int(train.max())] if train is not None else []))
        check_labels(targets, num_labels, args.labels, first_line)
        w = None
        if train is not None:
            check_labels(train, num_labels, args.train_labels, train_first)
            w = inverse_propensity(label_counts(train, num_labels), train.shape[0], args.a, args.b)
        results = {}
        for name, path, pred in zip(names, args.pred, preds):
            check_rows(pred, path, targets.shape[0], num_labels, args.labels)
            metrics = XMCMetrics(args.k, w)
            for start in range(0, pred.shape[0], CHUNK):
                metrics.update(pred[start:start + CHUNK], targets[start:start + CHUNK])
            results[name] = metrics.compute()
    except (ValueError, OSError) as err:
        print(f"eval_xmc: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{targets.shape[0]} points, {num_labels} labels; metrics in %")
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
