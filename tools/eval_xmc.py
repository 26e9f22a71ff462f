"""Score XMC predictions against true labels; prints a markdown table (one row per prediction file).

    python tools/eval_xmc.py --pred run_a.txt run_b.npz --labels test.txt --train-labels train.txt --k 1 3 5
    python tools/eval_xmc.py --pred test/predictions.txt --labels test.txt \
        --dev-pred dev/predictions.txt --dev-labels dev.txt      # + micro-F1 at a dev-tuned threshold

Prediction files, one row per test point, in the order of --labels (an XMC run writes one per head
with eval.prediction_k=K: <output_dir>/<head>/predictions.txt, in the data files' label ids; for
a raw-text corpus, the ids of the run's label_map.json):
  text  one line per point: space-separated 'id:score' pairs, best first (scores must not increase
        along a line); bare ids without scores are accepted too; an empty line = no prediction.
  .npz or .safetensors (told by content)  array `ids` [N, K] of integer label ids (-1 = none),
        best first, and optionally `scores` [N, K] (then checked to be non-increasing along each row).
Label files (--labels, --train-labels, --dev-labels): Extreme Classification Repository format (header 'N F L',
then 'l1,l2 f:v ...'), or plain text with one line of comma-separated label ids per point.
Propensity-scored metrics (PSP@k, PSnDCG@k) need --train-labels; values print in percent.
micro-F1 (with micro-P, micro-R) needs scores: the threshold on them is tuned on --dev-pred (one
file per --pred, same order) against --dev-labels and applied once to the --pred file; --threshold
fixes it instead; --micro-f1 alone tunes on the scored file itself and warns (optimistic).
Metric definitions and conventions: mhe_scale/eval/xmc.py and mhe_scale/eval/xmc_f1.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from torch import Tensor

from mhe_scale.data.prediction_arrays import array_format, read_prediction_arrays
from mhe_scale.data.xc_format import read_label_lists, read_predictions, read_xc_format
from mhe_scale.eval import XMCMetrics, format_table, inverse_propensity, label_counts, micro_f1, tune_micro_f1_threshold

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


def load_predictions(path: Path) -> tuple[Tensor, Tensor | None]:
    """-> (predicted ids [N, K], best first, -1 = none; scores [N, K] or None when the file has none)."""
    if array_format(path) is not None:
        return read_prediction_arrays(path)
    return read_predictions(path)


def check_rows(pred: Tensor, path: Path, num_points: int, num_labels: int, labels_path: Path) -> None:
    if pred.shape[0] != num_points:
        raise ValueError(f"{path} has {pred.shape[0]} rows but {labels_path} has {num_points} points; "
                         f"write one prediction line per test point, in the same order")
    bad = pred >= num_labels
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"{path}: row {row + 1} (line {row + 1} of a text file) predicts label "
                         f"{int(pred[bad][0])}, outside [0, {num_labels}); pass --num-labels or fix the ids")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, nargs="+", required=True, help="prediction files (text, .npz or .safetensors)")
    p.add_argument("--labels", type=Path, required=True, help="true labels of the test points")
    p.add_argument("--train-labels", type=Path, help="training labels, for propensities (PSP@k, PSnDCG@k)")
    p.add_argument("--labels-format", choices=("auto", "xc", "plain"), default="auto")
    p.add_argument("--num-labels", type=int, help="label count C when no XC header gives it")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--a", type=float, default=0.55, help="propensity A (Jain et al. 2016)")
    p.add_argument("--b", type=float, default=1.5, help="propensity B")
    p.add_argument("--names", nargs="+", help="run names for the table rows (default: file stems)")
    p.add_argument("--dev-pred", type=Path, nargs="+",
                   help="dev-split predictions, one per --pred file in the same order: micro-F1's threshold "
                        "is tuned on each and applied once to its --pred file (needs --dev-labels)")
    p.add_argument("--dev-labels", type=Path, help="true labels of the dev points (with --dev-pred)")
    p.add_argument("--threshold", type=float, help="micro-F1 at this fixed score threshold (no tuning)")
    p.add_argument("--micro-f1", action="store_true",
                   help="report micro-F1; without --dev-pred or --threshold the threshold is tuned on the "
                        "scored file itself (optimistic, warned)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if (args.dev_pred is None) != (args.dev_labels is None):
        p.error("--dev-pred and --dev-labels go together: the dev predictions and the dev split's true labels")
    if args.dev_pred is not None and len(args.dev_pred) != len(args.pred):
        p.error(f"--dev-pred needs one file per --pred file ({len(args.pred)}), in the same order; "
                f"got {len(args.dev_pred)}")
    if args.dev_pred is not None and args.threshold is not None:
        p.error("--threshold fixes micro-F1's threshold, --dev-pred tunes it: give one of them")
    args.micro_f1 = args.micro_f1 or args.dev_pred is not None or args.threshold is not None
    return args


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def f1_thresholds(args: argparse.Namespace, preds: list[tuple[Tensor, Tensor | None]], targets: Tensor,
                  dev: list[tuple[Tensor, Tensor | None]] | None, dev_targets: Tensor | None) -> list[dict]:
    """Per --pred file: {"threshold", "tuned on", "dev micro-F1"}; warns on stderr when tuned on the scored split."""
    out = []
    for i, (path, (_, scores)) in enumerate(zip(args.pred, preds)):
        if scores is None:
            raise ValueError(f"{path}: holds ids without scores; micro-F1 needs scores ('id:score' pairs, as an "
                             f"XMC run's predictions.txt has, or a 'scores' array)")
        if args.threshold is not None:
            out.append({"threshold": args.threshold, "tuned on": "fixed (--threshold)"})
            continue
        if dev is None:
            print(f"eval_xmc: warning: micro-F1's threshold for {path} is tuned on {args.labels}, the split being "
                  f"scored, so its micro-F1 is optimistic; tune on a dev split with --dev-pred / --dev-labels",
                  file=sys.stderr)
            ids, src, tgt = preds[i][0], str(args.labels), targets
        else:
            dev_path = args.dev_pred[i]
            if dev[i][1] is None:
                raise ValueError(f"{dev_path}: holds ids without scores; the threshold is tuned on scores "
                                 f"('id:score' pairs or a 'scores' array)")
            if _same_file(dev_path, path) or _same_file(args.dev_labels, args.labels):
                print(f"eval_xmc: warning: the dev files ({dev_path}, {args.dev_labels}) are the scored files "
                      f"({path}, {args.labels}): micro-F1 is tuned on the split being scored and is optimistic",
                      file=sys.stderr)
            ids, scores, src, tgt = dev[i][0], dev[i][1], str(dev_path), dev_targets
        threshold, dev_f1 = tune_micro_f1_threshold(ids, scores, tgt)
        out.append({"threshold": threshold, "tuned on": src, "dev micro-F1": dev_f1})
    return out


def k_caps_recall(ids: Tensor, scores: Tensor, threshold: float) -> float:
    """Fraction of rows whose every one of K predictions passes the threshold (K may cap recall)."""
    full = ids[:, -1] >= 0
    return float((full & (scores[:, -1] >= threshold)).double().mean()) if ids.shape[1] else 0.0


def print_thresholds(names: list[str], thresholds: list[dict]) -> None:
    print("micro-F1 thresholds (on the files' scores; exp(t) is a probability where scores are log-probabilities, "
          "as the project's heads write):")
    for name, th in zip(names, thresholds):
        t = th["threshold"]
        prob = f", exp(t) = {math.exp(t):.4g}" if t <= 0 else ""
        dev = f" (micro-F1 {100 * th['dev micro-F1']:.2f}% there)" if "dev micro-F1" in th else ""
        print(f"  {name}: t = {t:.6g}{prob}; tuned on {th['tuned on']}{dev}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        targets, header_labels, first_line = load_labels(args.labels, args.labels_format)
        train = dev_targets = None
        if args.train_labels is not None:
            train, train_header, train_first = load_labels(args.train_labels, args.labels_format)
            header_labels = max(header_labels or 0, train_header or 0) or None
        if args.dev_labels is not None:
            dev_targets, dev_header, dev_first = load_labels(args.dev_labels, args.labels_format)
            header_labels = max(header_labels or 0, dev_header or 0) or None
        preds = [load_predictions(path) for path in args.pred]
        dev = None if args.dev_pred is None else [load_predictions(path) for path in args.dev_pred]
        names = args.names or [path.stem for path in args.pred]
        if len(set(names)) < len(names) and not args.names:
            names = [str(path) for path in args.pred]
        if len(set(names)) != len(preds):
            raise ValueError(f"--names must give {len(preds)} distinct names, one per --pred file; got {names}")
        every = [targets, *(x for x, _ in preds + (dev or []))] + [t for t in (train, dev_targets) if t is not None]
        num_labels = args.num_labels or header_labels or 1 + max(int(x.max()) for x in every)
        check_labels(targets, num_labels, args.labels, first_line)
        w = None
        if train is not None:
            check_labels(train, num_labels, args.train_labels, train_first)
            w = inverse_propensity(label_counts(train, num_labels), train.shape[0], args.a, args.b)
        if dev is not None:
            check_labels(dev_targets, num_labels, args.dev_labels, dev_first)
            for path, (ids, _) in zip(args.dev_pred, dev):
                check_rows(ids, path, dev_targets.shape[0], num_labels, args.dev_labels)
        for path, (ids, _) in zip(args.pred, preds):
            check_rows(ids, path, targets.shape[0], num_labels, args.labels)
        thresholds = f1_thresholds(args, preds, targets, dev, dev_targets) if args.micro_f1 else []
        results = {}
        for i, (name, (pred, scores)) in enumerate(zip(names, preds)):
            metrics = XMCMetrics(args.k, w)
            for start in range(0, pred.shape[0], CHUNK):
                metrics.update(pred[start:start + CHUNK], targets[start:start + CHUNK])
            results[name] = metrics.compute()
            if thresholds:
                f1 = micro_f1(pred, scores, targets, thresholds[i]["threshold"])
                results[name].update({"micro-P": f1["precision"], "micro-R": f1["recall"], "micro-F1": f1["f1"]})
                capped = k_caps_recall(pred, scores, thresholds[i]["threshold"])
                if capped > 0.25:
                    print(f"eval_xmc: warning: {args.pred[i]}: in {100 * capped:.0f}% of rows all {pred.shape[1]} "
                          f"predictions pass the threshold, so the file's K caps micro-F1's recall; write more "
                          f"predictions per point (eval.prediction_k)", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"eval_xmc: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        for name, th in zip(names, thresholds):
            t = th["threshold"]
            results[name].update({"micro-F1 threshold": t if math.isfinite(t) else None,
                                  **{k: v for k, v in th.items() if k != "threshold"}})
        print(json.dumps(results, indent=2))
    else:
        print(f"{targets.shape[0]} points, {num_labels} labels; metrics in %")
        print(format_table(results))
        if thresholds:
            print_thresholds(names, thresholds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
