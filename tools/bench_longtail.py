"""Kang et al. 2021's protocol on CIFAR-10-LT (ratio 100) on a small CPU budget, several seeds.

    python tools/bench_longtail.py [--archive ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz]
        [--seeds 0 1 2] [--epochs 8] [--probe-epochs 4] [--width 8] [--batch 128] [--queue 1024]
        [--parallel 2] [--balanced-per-class 1240] [--deadline-min 45] [--out runs/bench_longtail]

Per seed s (train.seed = data.seed = s), every step a `mhe-scale train` subprocess (OMP_NUM_THREADS=1,
--parallel at once; a finished step, i.e. one with results.json, is not rerun):
  pre-training on the long-tailed list (tasks/contrastive.py): ce, moco, kcl;
  classifier stage on the frozen backbone (tasks/probe.py): ce -> cRT; moco -> linear probe;
  kcl -> linear probe and cRT; and for every method the balancedness probe: a linear classifier
  trained on a BALANCED subset of CIFAR-10 train (--balanced-per-class images per class, seeded)
  with the classes grouped by the long-tailed counts (probe.shot_counts_from).
Once (seed 0): MoCo pre-trained on the balanced subset, kNN accuracy after every epoch.
Per seed and --references method: the same pre-training on the balanced subset (as many images as
the long-tailed list) and the same balanced probe: the paper's claim is that the long tail costs
contrastive features less than CE features (the "cost of the long tail" table, paired by seed).
Tables: many / medium / few / all accuracy, mean ± std over the seeds, seconds per run; the
balancedness table (many, medium, gap); the balanced-MoCo kNN curve (a PNG if matplotlib imports).
CIFAR-10-LT r100 has no few-shot class (its smallest class has 50 images): "few" is n/a.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROUPS = ("many", "medium", "few", "overall")


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def make_lists(archive: str, lists: Path, per_class: int, seed: int = 0) -> None:
    """lists/r100.txt, test.txt (tools/make_longtail.py) and balanced.txt: per_class seeded training
    images of every class (images copied under lists/images like the others)."""
    if not (lists / "r100.txt").is_file():
        if load_tool("make_longtail").main(["cifar10", "--archive", archive, "--out", str(lists), "--ratios", "100"]):
            raise SystemExit("make_longtail failed")
    if (lists / "balanced.txt").is_file():
        return
    blobs: dict[str, bytes] = {}
    per_split, classes = load_tool("make_longtail").read_archive(Path(archive), lambda s, c, n, d: blobs.__setitem__(n, d)
                                                                 if s == "train" else None)
    ids = {c: i for i, c in enumerate(classes)}
    rng = np.random.default_rng([seed, 1240])
    lines = []
    for c in classes:
        names = [n for k, n in per_split["train"] if k == c]
        if len(names) < per_class:
            raise SystemExit(f"{archive}: class {c} has {len(names)} training images < --balanced-per-class {per_class}")
        for i in np.sort(rng.choice(len(names), per_class, replace=False)):
            dest = lists / "images" / names[i]
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(blobs[names[i]])
            lines.append(f"{names[i]} {ids[c]}\n")
    (lists / "balanced.txt").write_text("".join(lines))


class Job:
    def __init__(self, name: str, argv: list[str], out: Path, deps: tuple[str, ...] = ()) -> None:
        self.name, self.argv, self.out, self.deps = name, argv, out, deps
        self.seconds: float | None = None
        self.epoch_times: list[float] = []

    @property
    def done(self) -> bool:
        return (self.out / "results.json").is_file()

    def metrics(self) -> dict:
        if not self.done:
            return {}
        return next(iter(json.loads((self.out / "results.json").read_text()).values()))["metrics"]


def run_job(job: Job, log_dir: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    stop = threading.Event()

    def watch() -> None:  # wall time at each new eval_log line (balanced MoCo: one per epoch)
        seen = 0
        while not stop.wait(0.5):
            logs = list(job.out.glob("*/eval_log.jsonl"))
            n = len(logs[0].read_text().splitlines()) if logs else 0
            job.epoch_times += [time.perf_counter() - t0] * (n - seen)
            seen = max(seen, n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with open(log_dir / f"{job.name}.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "mhe_scale.cli", "train", *job.argv], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=REPO)
    stop.set()
    watcher.join()
    job.seconds = time.perf_counter() - t0
    if code:
        raise SystemExit(f"{job.name} failed ({code}); see {log_dir / (job.name + '.log')}")


def schedule(jobs: list[Job], parallel: int, log_dir: Path, deadline: float = math.inf) -> None:
    """Run jobs (in list order, when their deps are done), `parallel` at once; none starts after
    `deadline` (time.perf_counter() seconds)."""
    pending = [j for j in jobs if not j.done]
    running: dict[str, threading.Thread] = {}
    errors: list[BaseException] = []
    by_name = {j.name: j for j in jobs}

    def target(job: Job) -> None:
        try:
            run_job(job, log_dir)
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            errors.append(err)

    while pending or running:
        if errors:
            raise errors[0]
        for name in [n for n, t in running.items() if not t.is_alive()]:
            del running[name]
            print(f"[{time.strftime('%H:%M:%S')}] done {name} ({by_name[name].seconds:.0f} s)", flush=True)
        if time.perf_counter() > deadline and pending:
            print(f"deadline: {len(pending)} runs not started: {[j.name for j in pending]}", flush=True)
            pending.clear()
        for job in list(pending):
            if len(running) >= parallel:
                break
            if all(by_name[d].done for d in job.deps):
                pending.remove(job)
                running[job.name] = threading.Thread(target=target, args=(job,))
                running[job.name].start()
        time.sleep(0.5)
    if errors:
        raise errors[0]


def by_name(jobs: list[Job]) -> dict[str, Job]:
    return {j.name: j for j in jobs}


def mean_std(values: list[float]) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]  # a missing run gives None
    if not v:
        return "n/a"
    return f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(REPO.parent / "shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=8.0, help="pre-training epochs (also balanced MoCo)")
    parser.add_argument("--probe-epochs", type=float, default=4.0)
    parser.add_argument("--probe-lr", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--queue", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--balanced-per-class", type=int, default=1240)
    parser.add_argument("--balanced-epochs", type=float, default=None, help="balanced MoCo (default --epochs)")
    parser.add_argument("--evals-per-epoch", type=int, default=1, help="balanced MoCo: kNN passes per epoch")
    parser.add_argument("--references", nargs="*", default=["ce", "moco", "kcl"], choices=["ce", "moco", "kcl"],
                        help="methods also pre-trained on the balanced subset, every seed (what the long tail costs them)")
    parser.add_argument("--out", default="runs/bench_longtail")
    parser.add_argument("--deadline-min", type=float, default=math.inf, help="start no run after this many minutes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    lists = out / "lists"
    make_lists(args.archive, lists, args.balanced_per_class)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lt, bal = lists / "r100.txt", lists / "balanced.txt"
    common = [f"data.test_path={lists / 'test.txt'}", f"data.root={lists / 'images'}", f"model.width={args.width}",
              f"train.batch_size={args.batch}", "train.num_workers=0", "train.log_every=20", "train.eval_every=0",
              "train.save_every=1000000"]
    pre_cfg, probe_cfg = "configs/longtail/cifar10_lt100_kcl.yaml", "configs/longtail/cifar10_lt100_probe.yaml"
    jobs: list[Job] = []
    probes = {"ce": ("crt",), "moco": ("probe",), "kcl": ("probe", "crt")}
    for s in args.seeds:  # per seed: pre-training, then its classifier stages (a deadline keeps whole seeds)
        seed = [f"train.seed={s}", f"data.seed={s}"]
        for m in ("ce", "moco", "kcl"):
            o = out / f"s{s}" / m / "pretrain"
            jobs.append(Job(f"s{s}-{m}-pretrain", [pre_cfg, *common, *seed, f"data.path={lt}", f"contrastive.method={m}",
                                                   f"contrastive.queue_size={args.queue}", f"train.epochs={args.epochs}",
                                                   f"optim.lr={0.1 if m == 'ce' else 0.06}", f"train.output_dir={o}"], o))
        for m in ("ce", "moco", "kcl"):
            ck = out / f"s{s}" / m / "pretrain" / m
            stage = [probe_cfg, *common, *seed, f"probe.checkpoint={ck}", f"train.epochs={args.probe_epochs}",
                     f"optim.lr={args.probe_lr}"]
            for kind in (*probes[m], "balanced"):
                o = out / f"s{s}" / m / kind
                extra = {"crt": [f"data.path={lt}", "data.sampler=class_balanced"],
                         "probe": [f"data.path={lt}", "data.sampler=epoch"],
                         "balanced": [f"data.path={bal}", "data.sampler=epoch", f"probe.shot_counts_from={lt}"]}[kind]
                jobs.append(Job(f"s{s}-{m}-{kind}", [*stage, *extra, f"train.output_dir={o}"], o, (f"s{s}-{m}-pretrain",)))
    steps_per_epoch = 10 * args.balanced_per_class // args.batch
    every = steps_per_epoch // args.evals_per_epoch
    o = out / "balanced_moco"
    jobs.insert(3, Job("balanced-moco", [pre_cfg, *common, "train.seed=0", "data.seed=0", f"data.path={bal}",
                                         "data.name=cifar10-balanced", "contrastive.method=moco",
                                         f"contrastive.queue_size={args.queue}",
                                         f"train.epochs={args.balanced_epochs or args.epochs}", f"train.eval_every={every}", "optim.lr=0.06",
                                         f"train.output_dir={o}"], o))
    o = out / "balanced_moco" / "balanced"
    jobs.append(Job("balanced-moco-balanced", [probe_cfg, *common, "train.seed=0", "data.seed=0",
                                               f"probe.checkpoint={out / 'balanced_moco' / 'moco'}",
                                               f"train.epochs={args.probe_epochs}", f"optim.lr={args.probe_lr}",
                                               f"data.path={bal}", "data.sampler=epoch", f"probe.shot_counts_from={lt}",
                                               f"train.output_dir={o}"], o, ("balanced-moco",)))
    for s in args.seeds:  # the same pre-training on the balanced subset: what the long tail costs each method
        seed = [f"train.seed={s}", f"data.seed={s}"]
        for m in args.references:
            if (m, s) == ("moco", 0):
                continue  # the kNN-curve run above is this reference
            o = out / f"s{s}" / f"{m}_balanced" / "pretrain"
            jobs.append(Job(f"s{s}-{m}-balpretrain", [pre_cfg, *common, *seed, f"data.path={bal}", "data.name=cifar10-balanced",
                                                      f"contrastive.method={m}", f"contrastive.queue_size={args.queue}",
                                                      f"train.epochs={args.balanced_epochs or args.epochs}",
                                                      f"optim.lr={0.1 if m == 'ce' else 0.06}", f"train.output_dir={o}"], o))
            o = out / f"s{s}" / f"{m}_balanced" / "balanced"
            jobs.append(Job(f"s{s}-{m}-balref", [probe_cfg, *common, *seed, f"probe.checkpoint={o.parent / 'pretrain' / m}",
                                                 f"train.epochs={args.probe_epochs}", f"optim.lr={args.probe_lr}",
                                                 f"data.path={bal}", "data.sampler=epoch", f"probe.shot_counts_from={lt}",
                                                 f"train.output_dir={o}"], o, (f"s{s}-{m}-balpretrain",)))
    if (out / "bench.json").is_file():  # a rerun: the seconds of the runs it does not repeat
        prior = json.loads((out / "bench.json").read_text())
        for j in jobs:
            if j.done:
                j.seconds = prior.get("seconds", {}).get(j.name)
        if by_name(jobs)["balanced-moco"].done:
            by_name(jobs)["balanced-moco"].epoch_times = prior.get("balanced_epoch_times", [])
    schedule(jobs, args.parallel, out / "logs", start + 60 * args.deadline_min)
    by = {j.name: j for j in jobs}
    text = report(args, by, out, time.perf_counter() - start)
    print(text)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "seconds": {j.name: j.seconds for j in jobs},
                                                "metrics": {j.name: j.metrics() for j in jobs if j.done},
                                                "balanced_epoch_times": by["balanced-moco"].epoch_times}, indent=1))
    return 0


def reference_job(by: dict[str, Job], method: str, seed: int) -> Job:
    """The balanced probe over features pre-trained on the balanced subset (method, seed)."""
    return by["balanced-moco-balanced"] if (method, seed) == ("moco", 0) else by[f"s{seed}-{method}-balref"]


def cost_table(args: argparse.Namespace, by: dict[str, Job]) -> str:
    """Kang et al.'s claim: the same linear classifier (balanced data) over features pre-trained on the
    long-tailed list vs on a balanced subset of the same size; the cost of the long tail per method,
    paired by seed."""
    lines = ["| balanced linear classifier, all classes | features from the LT list | features from the balanced "
             "subset | cost of the long tail (paired by seed) |", "|---|---|---|---|"]
    names = {"ce": "CE", "moco": "MoCo v2", "kcl": "KCL (k=6)"}
    for m in args.references:
        pairs = [(by[f"s{s}-{m}-balanced"].metrics().get("overall"), reference_job(by, m, s).metrics().get("overall"))
                 for s in args.seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            lt_acc, bal_acc = zip(*pairs)
            lines.append(f"| {names[m]} | {mean_std(list(lt_acc))} | {mean_std(list(bal_acc))} | "
                         f"{mean_std([b - a for a, b in pairs])} ({len(pairs)} seeds) |")
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace, by: dict[str, Job], out: Path, total: float) -> str:
    """The three markdown tables of the module docstring."""
    seeds = args.seeds

    def secs(*names: str) -> str:
        v = [sum(by[f"s{s}-{n}"].seconds or math.nan for n in names) for s in seeds]
        v = [x for x in v if not math.isnan(x)]
        return f"{np.mean(v):.0f}" if v else "(earlier run)"

    rows = [("supervised CE (its own classifier)", "ce-pretrain", "classifier_", ("ce-pretrain",)),
            ("CE + cRT", "ce-crt", "", ("ce-pretrain", "ce-crt")),
            ("MoCo v2 + linear probe", "moco-probe", "", ("moco-pretrain", "moco-probe")),
            ("KCL (k=6) + linear probe", "kcl-probe", "", ("kcl-pretrain", "kcl-probe")),
            ("KCL (k=6) + cRT", "kcl-crt", "", ("kcl-pretrain", "kcl-crt"))]
    lines = ["| method | many | medium | few | all | s per run (pre-train + classifier) |", "|---|---|---|---|---|---|"]
    for label, job, prefix, parts in rows:
        cells = [mean_std([by[f"s{s}-{job}"].metrics().get(prefix + g) for s in seeds]) for g in GROUPS]
        lines.append(f"| {label} | {' | '.join(cells)} | {secs(*parts)} |")
    lines.append("")
    lines.append("| kNN (k 200) on the LT features | many | medium | all |\n|---|---|---|---|")
    for m, label in (("ce", "CE"), ("moco", "MoCo v2"), ("kcl", "KCL")):
        cells = [mean_std([by[f"s{s}-{m}-pretrain"].metrics().get(f"knn_{g}") for s in seeds]) for g in ("many", "medium", "overall")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append("")
    lines.append("| balancedness: linear classifier on balanced data over LT-learned features | many | medium | "
                 "gap many − medium | all |\n|---|---|---|---|---|")
    for m, label in (("ce", "CE"), ("moco", "MoCo v2"), ("kcl", "KCL")):
        ms = [x for x in (by[f"s{s}-{m}-balanced"].metrics() for s in seeds) if x]
        gap = mean_std([x["many"] - x["medium"] for x in ms])
        lines.append(f"| {label} | {mean_std([x['many'] for x in ms])} | {mean_std([x['medium'] for x in ms])} | "
                     f"{gap} | {mean_std([x['overall'] for x in ms])} |")
    ref = by["balanced-moco-balanced"].metrics()
    if ref:
        lines.append(f"| reference: MoCo v2 pre-trained on the balanced subset ({args.balanced_epochs or args.epochs:g} "
                     f"epochs, seed 0) | {mean_std([ref['many']])} | {mean_std([ref['medium']])} | "
                     f"{mean_std([ref['many'] - ref['medium']])} | {mean_std([ref['overall']])} |")
    lines.append("")
    if args.references:
        lines.append(cost_table(args, by))
    bal = by["balanced-moco"]
    logs = list(out.joinpath("balanced_moco").glob("*/eval_log.jsonl"))
    evals = [json.loads(l) for l in logs[0].read_text().splitlines()] if logs else []
    times = bal.epoch_times
    lines.append("| MoCo v2 on balanced CIFAR-10 subset: epoch | kNN all | wall s since start (epoch + kNN pass) |"
                 "\n|---|---|---|")
    for i, e in enumerate(evals):
        lines.append(f"| {(i + 1) / args.evals_per_epoch:g} | {100 * e['knn_overall']:.1f} | {times[i]:.0f} |" if i < len(times)
                     else f"| {(i + 1) / args.evals_per_epoch:g} | {100 * e['knn_overall']:.1f} | (earlier run) |")
    if len(times) > 1:
        lines.append(f"\nbalanced MoCo: {args.evals_per_epoch * np.mean(np.diff(times)):.0f} s per epoch (training + kNN pass over "
                     f"{10 * args.balanced_per_class:,} + 10,000 images)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot([(i + 1) / args.evals_per_epoch for i in range(len(evals))], [100 * e["knn_overall"] for e in evals], marker="o")
        ax.set_xlabel("epoch"), ax.set_ylabel("kNN accuracy (%)"), ax.set_title("MoCo v2, balanced CIFAR-10 subset")
        fig.tight_layout()
        fig.savefig(out / "balanced_moco_knn.png", dpi=100)
        lines.append(f"\nplot: {out / 'balanced_moco_knn.png'}")
    except ImportError:
        lines.append("\n(matplotlib does not import: no plot)")
    lines.append(f"\ntotal {total / 60:.1f} min; seeds {seeds}; {args.epochs:g} pre-training epochs, {args.probe_epochs:g} "
                 f"classifier epochs (lr {args.probe_lr:g}); ResNet-18 width {args.width}, batch {args.batch}, queue "
                 f"{args.queue}; balanced subset {args.balanced_per_class} per class")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
