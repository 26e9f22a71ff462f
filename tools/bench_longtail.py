"""Kang et al. 2021's protocol on CIFAR-10-LT (ratio 100) within a wall-clock budget: pre-train each
method (kcl, moco, ce) for a few epochs, then score its backbone by weighted kNN and by cRT
(classifier re-trained with class-balanced sampling on the frozen backbone, tau-normalised too),
overall and by shot group.

    python tools/bench_longtail.py [--archive ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz]
        [--methods kcl moco ce] [--epochs 2] [--probe-epochs 1] [--width 16] [--budget-min 15]
        [--out runs/bench_longtail] [--markdown]

Lists come from tools/make_longtail.py (made once under OUT/lists). Every run goes through
`mhe-scale train` (tasks/contrastive.py, tasks/probe.py). A method whose pre-training would start
after the budget is spent is skipped with a note. CIFAR-10-LT r100 has no few-shot class (its
smallest class has 50 images), so "few" is n/a.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz"))
    parser.add_argument("--methods", nargs="+", default=["kcl", "moco", "ce"])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--probe-epochs", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-min", type=float, default=15.0)
    parser.add_argument("--out", default="runs/bench_longtail")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from mhe_scale.train import main as train_main

    start = time.perf_counter()
    out = Path(args.out)
    lists = out / "lists"
    if not (lists / "r100.txt").is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("make_longtail", REPO / "tools" / "make_longtail.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        if tool.main(["cifar10", "--archive", args.archive, "--out", str(lists), "--ratios", "100"]) != 0:
            return 2
    data = [f"data.path={lists / 'r100.txt'}", f"data.test_path={lists / 'test.txt'}", f"data.root={lists / 'images'}",
            f"model.width={args.width}", f"train.batch_size={args.batch}", f"train.num_workers={args.workers}",
            "train.save_every=0", "train.log_every=20", "train.eval_every=0"]
    rows = {}
    for method in args.methods:
        spent = time.perf_counter() - start
        if spent > args.budget_min * 60:
            rows[method] = {"note": f"skipped: budget spent after {spent / 60:.1f} min"}
            continue
        run = out / method
        t0 = time.perf_counter()
        code = train_main(["configs/longtail/cifar10_lt100_kcl.yaml", *data, f"contrastive.method={method}",
                           f"contrastive.queue_size={args.queue}", f"train.epochs={args.epochs}",
                           "train.save_every=1000000", f"train.output_dir={run / 'pretrain'}",
                           "optim.lr=0.06" if method != "ce" else "optim.lr=0.1"])
        if code:
            return code
        pre_s = time.perf_counter() - t0
        knn = next(iter(json.loads((run / "pretrain" / "results.json").read_text()).values()))["metrics"]
        t1 = time.perf_counter()
        code = train_main(["configs/longtail/cifar10_lt100_probe.yaml", *data, "data.sampler=class_balanced",
                           f"probe.checkpoint={run / 'pretrain' / method}", f"train.epochs={args.probe_epochs}",
                           "optim.lr=1.0", f"train.output_dir={run / 'crt'}"])
        if code:
            return code
        crt = next(iter(json.loads((run / "crt" / "results.json").read_text()).values()))["metrics"]
        best = max((k for k in crt if k.endswith("_overall") and k.startswith("tau")), key=lambda k: crt[k])
        rows[method] = {"pretrain s": pre_s, "probe s": time.perf_counter() - t1, "knn": knn, "crt": crt,
                        "best_tau": best[3:-8], "best_tau_metrics": {g: crt[f"{best[:-8]}_{g}"] for g in
                                                                      ("overall", "many", "medium", "few")}}
    header = ("| method | pre-train + kNN s | kNN overall / many / medium | cRT overall / many / medium | "
              "best τ (test) overall / many / medium |\n|---|---|---|---|---|")
    lines = [header]
    for method, r in rows.items():
        if "note" in r:
            lines.append(f"| {method} | {r['note']} | | | |")
            continue
        k, c, b = r["knn"], r["crt"], r["best_tau_metrics"]
        lines.append(f"| {method} | {r['pretrain s']:.0f} | {pct(k['knn_overall'])} / {pct(k['knn_many'])} / "
                     f"{pct(k['knn_medium'])} | {pct(c['overall'])} / {pct(c['many'])} / {pct(c['medium'])} | "
                     f"τ={r['best_tau']}: {pct(b['overall'])} / {pct(b['many'])} / {pct(b['medium'])} |")
    table = "\n".join(lines)
    total = time.perf_counter() - start
    print(table)
    print(f"\ntotal {total / 60:.1f} min (budget {args.budget_min} min); epochs {args.epochs} pre-train, "
          f"{args.probe_epochs} cRT; ResNet-18 width {args.width}, batch {args.batch}, queue {args.queue}")
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows, "total_s": total}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
