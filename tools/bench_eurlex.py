#!/usr/bin/env python
"""EURLEX57K end to end: baselines and trained heads on the same TF-IDF features, dev for every choice,
test scored once per final config; one markdown table + JSON rows.

    python tools/bench_eurlex.py [--data ../shared/data/eurlex57k] [--json results/eurlex57k.json]

Settings come from configs/xmc/eurlex57k_tfidf.yaml (`--set key=value ...` overrides every trained run).
Rows, all on the test split:
  most frequent        the 5 most frequent training labels for every document
  TF-IDF kNN           label votes of the k most similar training documents, k chosen on dev (--knn-k)
  OvR ridge            one-vs-rest least squares (scikit-learn Ridge, one Cholesky for all labels) on the
                       --ridge-features most frequent TF-IDF terms, alpha chosen on dev (--ridge-alpha)
  fc / mhc / mhc (cluster groups) / mhp   MLP encoder + head, --seeds (mean ± std); mhc's groups and candidate
                       count chosen on dev with the first seed (--groups x --candidates); the cluster row
                       renumbers labels by data.label_order=cluster (groups from the training documents)
Every choice maximises RP@5 on dev. micro-F1: the threshold that maximises it on dev predictions, applied once
to the test predictions. Each configuration runs in a forked child: its peak RSS is that child's (the
shared, already-loaded features included). mhs and partial_fc are single-label heads (refused on
multi-label data), so they have no row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "xmc" / "eurlex57k_tfidf.yaml"
SELECT = "RP@5"
COLUMNS = ("P@1", "P@3", "P@5", "RP@5", "nDCG@5", "PSP@5", "micro-F1")
PUBLISHED = [("BERT-base (Chalkidis et al. 2019/2020; SOURCE.md)", {"P@5": 68.7, "RP@5": 79.6, "nDCG@5": 82.3,
                                                                   "micro-F1": 73.2})]


def _convert(obj: Any, kind: type, to: Callable[[Any], Any]) -> Any:
    """obj with every `kind` inside dicts / tuples / lists replaced by to(it)."""
    if isinstance(obj, kind):
        return to(obj)
    if isinstance(obj, dict):
        return {k: _convert(v, kind, to) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(v, kind, to) for v in obj)
    return obj


def forked(fn: Callable[..., dict], *args: Any) -> dict:
    """fn(*args) in a forked child (the loaded data shared copy-on-write) -> its result + "peak RSS (GB)"."""
    import numpy as np
    import torch

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run() -> None:
        out = fn(*args)
        out["peak RSS (GB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
        child.send(_convert(out, torch.Tensor, lambda t: t.numpy()))  # tensors would travel as shared-memory fds

    proc = ctx.Process(target=run)
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the child running {fn.__name__} died (exit code {proc.exitcode}); see its stderr") from None
    proc.join()
    return _convert(result, np.ndarray, torch.from_numpy)


def scored(dev: tuple, test: tuple, dev_targets, test_targets, ks, inv_propensity) -> dict[str, float]:
    """Test metrics of (scores, ids) predictions + micro-F1 at the threshold tuned on the dev predictions."""
    from mhe_scale.eval.xmc import xmc_metrics
    from mhe_scale.eval.xmc_f1 import micro_f1, tune_micro_f1_threshold

    metrics = xmc_metrics(test[1], test_targets, ks, inv_propensity)
    threshold, dev_f1 = tune_micro_f1_threshold(dev[1], dev[0], dev_targets)
    metrics["micro-F1"] = micro_f1(test[1], test[0], test_targets, threshold)["f1"]
    metrics["dev micro-F1"] = dev_f1
    return metrics


# ------------------------------------------------------------------ baselines
def baselines(data: dict, args: argparse.Namespace, ks: list[int]) -> dict[str, dict]:
    from mhe_scale.eval import xmc_baselines as xb
    from mhe_scale.eval.xmc import xmc_metrics

    dev, test = data["dev"], data["test"]
    top = max(ks)
    c = dev.num_classes
    x = {s: xb.to_scipy(d.crow, d.col, d.values, d.num_features) for s, d in
         (("train", dev.train), ("dev", dev.test), ("test", test.test))}
    y = xb.multi_hot_csr(dev.train.labels, c)
    w = test.inv_propensity
    rows: dict[str, dict] = {}

    def popularity() -> dict:
        preds = {s: xb.popularity_predictions(dev.label_counts, x[s].shape[0], top) for s in ("dev", "test")}
        return {"metrics": scored(preds["dev"], preds["test"], dev.test.labels, test.test.labels, ks, w)}

    def knn() -> dict:
        start = time.perf_counter()
        on_dev = xb.knn_predictions(x["train"], y, x["dev"], args.knn_k, top)
        sweep = {k: xmc_metrics(p[1], dev.test.labels, ks)[SELECT] for k, p in on_dev.items()}
        best = max(sweep, key=sweep.get)
        on_test = xb.knn_predictions(x["train"], y, x["test"], [best], top)[best]
        return {"metrics": scored(on_dev[best], on_test, dev.test.labels, test.test.labels, ks, w),
                "choice": {"k": best}, "dev sweep": sweep, "train s": time.perf_counter() - start}

    def ridge() -> dict:
        start = time.perf_counter()
        cols = xb.frequent_columns(x["train"], args.ridge_features)
        sub = {s: m[:, cols] for s, m in x.items()}
        sweep, best_pred, best_coef = {}, None, None
        for alpha in args.ridge_alpha:
            coef = xb.ridge_ovr(sub["train"], y, alpha)
            pred = xb.linear_predictions(sub["dev"], coef, top)
            sweep[alpha] = xmc_metrics(pred[1], dev.test.labels, ks)[SELECT]
            if sweep[alpha] == max(sweep.values()):
                best_pred, best_coef, best = pred, coef, alpha
            print(f"  ridge alpha {alpha}: dev {SELECT} {100 * sweep[alpha]:.2f}", flush=True)
        on_test = xb.linear_predictions(sub["test"], best_coef, top)
        return {"metrics": scored(best_pred, on_test, dev.test.labels, test.test.labels, ks, w),
                "choice": {"alpha": best, "features": len(cols)}, "dev sweep": sweep,
                "train s": time.perf_counter() - start, "head params": int(best_coef.size)}

    for name, fn in (("most frequent (train)", popularity), ("TF-IDF kNN", knn), ("OvR ridge (TF-IDF)", ridge)):
        if name.split(" ")[0].lower() in args.skip:
            continue
        rows[name] = forked(fn)
        print(f"{name}: " + "  ".join(f"{m} {100 * rows[name]['metrics'][m]:.2f}" for m in COLUMNS), flush=True)
    return rows


# ------------------------------------------------------------------ trained heads
def seeded(overrides: list[str], seed: int) -> Any:
    from mhe_scale.config import load_config

    return load_config(CONFIG, [*overrides, f"train.seed={seed}"])


def train_once(overrides: list[str], seed: int, head_cfg: Any, data: Any, predict_on: dict) -> dict:
    from accelerate import Accelerator

    from mhe_scale.tasks.xmc import train_head

    out = train_head(seeded(overrides, seed), head_cfg, data, Accelerator(cpu=True), predict_on=predict_on)
    out.pop("resume", None)
    return out


def mhc_config(base: Any, groups: int, candidates: int) -> Any:
    return replace(base, num_groups=groups, top_k_groups=candidates)


def sweep_mhc(data: dict, overrides: list[str], head: Any, args: argparse.Namespace) -> dict:
    """Dev RP@5 of every (groups, candidates) with the first seed -> {"best": (G, K), "sweep": {...}};
    a single pair is taken as given (nothing to choose, no dev run)."""
    if len(args.groups) * len(args.candidates) == 1:
        return {"best": (args.groups[0], args.candidates[0]), "sweep": {}}
    sweep = {}
    for g in args.groups:
        for k in args.candidates:
            run = forked(train_once, overrides, args.seeds[0], mhc_config(head, g, k), data["dev"], {})
            sweep[f"G={g} K={k}"] = run["metrics"] | {"train s": run["costs"]["train s"]}
            print(f"  mhc G={g} K={k}: dev {SELECT} {100 * run['metrics'][SELECT]:.2f}  P@1 "
                  f"{100 * run['metrics']['P@1']:.2f}  train {run['costs']['train s']:.0f}s", flush=True)
    best = max(sweep, key=lambda key: sweep[key][SELECT])
    g, k = (int(part.split("=")[1]) for part in best.split())
    return {"best": (g, k), "sweep": sweep}


def trained_row(data_dev: Any, data_test: Any, overrides: list[str], head_cfg: Any, seeds: list[int],
                ks: list[int]) -> dict:
    runs = []
    for seed in seeds:
        run = forked(train_once, overrides, seed, head_cfg, data_test, {"dev": data_dev.test, "test": data_test.test})
        preds = run.pop("predictions")
        run["metrics"] = scored(preds["dev"], preds["test"], data_dev.test.labels, data_test.test.labels, ks,
                                data_test.inv_propensity)
        runs.append(run)
        print(f"  {head_cfg.name} seed {seed}: " + "  ".join(f"{m} {100 * run['metrics'][m]:.2f}" for m in COLUMNS)
              + f"  train {run['costs']['train s']:.0f}s", flush=True)
    keys = runs[0]["metrics"]
    return {"metrics": {m: statistics.fmean(r["metrics"][m] for r in runs) for m in keys},
            "std": {m: statistics.pstdev(r["metrics"][m] for r in runs) for m in keys},
            "train s": statistics.fmean(r["costs"]["train s"] for r in runs),
            "head params": round(runs[0]["costs"]["head params (K)"] * 1e3),
            "peak RSS (GB)": max(r["peak RSS (GB)"] for r in runs),
            "config": {k: v for k, v in vars(head_cfg).items() if v is not None},
            "per seed": {seed: r["metrics"] | {"train s": r["costs"]["train s"]} for seed, r in zip(seeds, runs)}}


# ------------------------------------------------------------------ table
def markdown(rows: dict[str, dict], seeds: list[int]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " | train s | head params | peak RSS GB |",
             "|---|" + "---:|" * (len(COLUMNS) + 3)]
    for name, row in rows.items():
        cells = []
        for c in COLUMNS:
            cell = f"{100 * row['metrics'][c]:.2f}"
            if "std" in row and len(seeds) > 1:
                cell += f" ± {100 * row['std'][c]:.2f}"
            cells.append(cell)
        train = f"{row['train s']:.0f}" if "train s" in row else "-"
        params = f"{row['head params']:,}" if "head params" in row else "-"
        rss = f"{row['peak RSS (GB)']:.2f}" if "peak RSS (GB)" in row else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {train} | {params} | {rss} |")
    for name, numbers in PUBLISHED:
        lines.append(f"| published: {name} | " + " | ".join(f"{numbers[c]:.1f}" if c in numbers else "-"
                                                            for c in COLUMNS) + " | - | - | - |")
    return "\n".join(lines)


def provenance(argv: list[str]) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    return {"command": "python tools/bench_eurlex.py " + " ".join(argv), "commit": commit + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "load average": load}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "eurlex57k",
                        help="EURLEX57K folder in either layout ({train,dev,test}.jsonl.gz or folders + labels.json)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--groups", nargs="+", type=int, default=[32, 64, 128], help="mhc num_groups tried on dev")
    parser.add_argument("--candidates", nargs="+", type=int, default=[8, 16], help="mhc top_k_groups tried on dev")
    parser.add_argument("--knn-k", nargs="+", type=int, default=[5, 10, 25, 50], help="kNN neighbours tried on dev")
    parser.add_argument("--ridge-alpha", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    parser.add_argument("--ridge-features", type=int, default=5000, help="most frequent TF-IDF terms the ridge sees")
    parser.add_argument("--heads", nargs="+", default=["fc", "mhc", "mhc_cluster", "mhp"],
                        choices=["fc", "mhc", "mhc_cluster", "mhp"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["most", "tf-idf", "ovr"],
                        help="baselines to leave out (most frequent, TF-IDF kNN, OvR ridge)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", help="data.cache_dir (features and rows); default ~/.cache/mhe_scale")
    parser.add_argument("--json", type=Path, help="write the rows and provenance here (e.g. results/eurlex57k.json)")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every trained run and the data, e.g. --set train.epochs=2")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder; point it at the EURLEX57K folder (SOURCE.md)")

    import torch

    from mhe_scale.config import HeadConfig, to_object
    from mhe_scale.data.xmc_text import TextFormatError
    from mhe_scale.tasks.xmc import load_xmc, unseen_label_count

    import accelerate  # noqa: F401  (imported once here, not in every forked child)
    import mhe_scale.engine.loop  # noqa: F401

    torch.set_num_threads(args.threads)
    fixed = [f"data.path={args.data}", f"train.threads={args.threads}", "train.resume=false", "train.loss_log=false",
             "train.save_every=0", "eval.prediction_k=0"] + ([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])
    overrides = fixed + args.overrides
    launched = provenance(argv)  # the code that runs is the commit at the start, not at the end
    start = time.perf_counter()
    cfg = seeded(overrides, args.seeds[0])
    data: dict[str, Any] = {}
    try:
        for order in ("given", "cluster") if "mhc_cluster" in args.heads else ("given",):
            for split in ("dev", "test"):
                key = split if order == "given" else f"{split} cluster"
                data[key] = load_xmc(replace(to_object(cfg).data, eval_split=split, label_order=order))
    except (TextFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ks = sorted(set(cfg.eval.ks) | {5})
    unseen, occurrences = unseen_label_count(data["test"])
    info = {"train": len(data["dev"].train), "dev": len(data["dev"].test), "test": len(data["test"].test),
            "features": data["dev"].num_features, "labels": data["dev"].num_classes,
            "labels seen in train": int((data["dev"].label_counts > 0).sum()),
            "test labels never in train": unseen, "test occurrences of them": occurrences,
            "load s": time.perf_counter() - start}
    print(json.dumps(info), flush=True)

    rows = baselines(data, args, ks)
    head = to_object(cfg).head
    choice: dict[str, Any] = {}
    if {"mhc", "mhc_cluster"} & set(args.heads):
        choice = sweep_mhc(data, overrides, head, args)
        print(f"mhc chosen on dev: G={choice['best'][0]} K={choice['best'][1]}", flush=True)
    for name in args.heads:
        if name == "fc":
            row = trained_row(data["dev"], data["test"], overrides, HeadConfig(name="fc"), args.seeds, ks)
            label = "fc (full BCE)"
        elif name in ("mhc", "mhc_cluster"):
            suffix = "" if name == "mhc" else " cluster"
            hc = mhc_config(head, *choice["best"])
            row = trained_row(data["dev" + suffix], data["test" + suffix], overrides, hc, args.seeds, ks)
            label = f"mhc G={hc.num_groups} K={hc.top_k_groups}" + (" (label-tree groups, label_order=cluster)" if suffix else "")
        else:
            row = trained_row(data["dev"], data["test"], overrides, HeadConfig(name="mhp", num_heads=2), args.seeds, ks)
            label = "mhp (2 heads; caveat: digits shared by many labels)"
        rows[label] = row
    table = markdown(rows, args.seeds)
    total = time.perf_counter() - start
    print(f"\n{table}\n\n(total {total:.0f}s, torch {torch.__version__}, {args.threads} thread(s), seeds {args.seeds})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = launched | {"load average at the end": provenance(argv)["load average"], "total s": total, "data": info, "mhc dev sweep": choice.get("sweep"),
                                     "rows": rows, "published": PUBLISHED}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(args.json)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
