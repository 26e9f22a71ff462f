#!/usr/bin/env python
"""What `engine.fit` costs over a plain PyTorch loop: same model, same batches, same optimizer.

    python tools/bench_engine_overhead.py --steps 40 --batch-size 64 --width 16 --repeats 3

Model: ResNet-18 (CIFAR stem, base width --width) + fc head over 10 classes (engine.model.Classifier);
data: fixed random 32x32 images in memory (a TensorDataset), so the loop itself, not JPEG decoding, is
what is timed. Both loops read the batches of data.samplers.EpochBatchSampler (seed = train.seed) through a
DataLoader in the main process and step torch SGD (momentum, weight decay) from the same initial weights:

- fit: one process, no checkpoints (train.save_every=0), train.log_every larger than the run, constant lr;
- plain: the ~20-line loop `loss, _ = model(x, y); loss.backward(); opt.step(); opt.zero_grad()`.

After one untimed warm-up run of each, repeats alternate the order (plain first, then fit first, ...) to
cancel drift in machine load. Reported: seconds per optimizer step of each loop, CPU time of this process
and wall time, between the first and the last step (set-up and the first step left out; fit's clock is its
step_callback), the medians' overhead in percent, and whether both end with the same weights and
batch-norm statistics (max |difference| over every tensor of the state dict).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (one epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base channels")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data and batch order")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.width, args.repeats) < 1:
        parser.error("--steps, --batch-size, --width and --repeats must be >= 1")
    return args


def bench_config(args: argparse.Namespace, out: Path):
    """The classify config both loops follow (model, optimizer, train.*)."""
    from mhe_scale.config import load_config

    return load_config(None, ["task=classify", "model.name=resnet18", "model.stem=cifar", f"model.width={args.width}",
                              "head={name:fc}", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
                              "optim.weight_decay=5e-4", "train.epochs=1", f"train.batch_size={args.batch_size}",
                              "train.save_every=0", "train.log_every=1000000000", "train.num_workers=0",
                              "train.resume=false", "train.schedule=constant", f"train.seed={args.seed}",
                              f"train.output_dir={out}"])


def build_model(cfg) -> torch.nn.Module:
    """Classifier(ResNet, fc head), initialised from train.seed (the same weights every call)."""
    from mhe_scale.engine.model import Classifier
    from mhe_scale.heads.factory import build_head
    from mhe_scale.models.image import build_image_model

    torch.manual_seed(cfg.train.seed)
    backbone = build_image_model(cfg.model)
    return Classifier(backbone, build_head(cfg.head, backbone.num_features, NUM_CLASSES, multilabel=False))


def make_data(num: int, seed: int) -> TensorDataset:
    """num random images [num, 3, 32, 32] and labels [num] (fixed by seed)."""
    g = torch.Generator().manual_seed(seed + 1)
    return TensorDataset(torch.randn(num, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (num,), generator=g))


class StepClock:
    """Wall and CPU (this process) time after every optimizer step; per-step cost = (last - first) / (steps - 1),
    so set-up and the first step are left out. CPU time is what the loop itself spends, insensitive to the
    other jobs of a shared machine; wall time is what a user waits."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, step: int = 0) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def per_step(self) -> tuple[float, float]:
        """(wall s, CPU s) per step between the first and the last mark."""
        n = max(len(self.wall) - 1, 1)
        return (self.wall[-1] - self.wall[0]) / n, (self.cpu[-1] - self.cpu[0]) / n


def plain_loop(cfg, data: TensorDataset) -> tuple[dict[str, Tensor], StepClock]:
    """The reference loop -> (final state_dict, its step clock)."""
    from mhe_scale.data.samplers import build_sampler
    from mhe_scale.engine.model import build_optimizers

    model = build_model(cfg)
    optimizer, _ = build_optimizers(cfg.optim, model)
    sampler = build_sampler("epoch", None, micro_batch=cfg.train.batch_size, grad_accum_steps=1, num_processes=1,
                            rank=0, seed=cfg.train.seed, num_samples=len(data))
    loader = DataLoader(data, batch_sampler=sampler)
    clock = StepClock()
    model.train()
    sampler.set_position(0, 0)
    for inputs, targets in loader:
        loss, _ = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clock


def fit_loop(cfg, data: TensorDataset, accelerator) -> tuple[dict[str, Tensor], StepClock, float]:
    """engine.fit on the same model / data -> (final state_dict, step clock, whole-call wall s per step)."""
    from mhe_scale.engine.loop import fit
    from mhe_scale.engine.model import build_optimizers

    model = build_model(cfg)
    optimizer, head_optimizer = build_optimizers(cfg.optim, model)
    clock = StepClock()
    start = time.perf_counter()
    result = fit(model, optimizer, data, cfg.train, accelerator, desc="fit", head_optimizer=head_optimizer,
                 step_callback=clock)
    whole = (time.perf_counter() - start) / result.steps
    state = accelerator.unwrap_model(model).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}, clock, whole


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a - b| over every tensor of two state dicts with the same keys (inf if the keys differ)."""
    if a.keys() != b.keys():
        return float("inf")
    return max(((x.double() - b[k].double()).abs().max().item() if x.numel() else 0.0) for k, x in a.items())


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from mhe_scale.engine.accelerator import build_accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        cfg = bench_config(args, Path(tmp))
        data = make_data(args.steps * args.batch_size, args.seed)
        accelerator = build_accelerator(cfg.dist, cfg.train)
        plain, fitted, whole, diffs = [], [], [], []
        plain_loop(cfg, data)  # untimed warm-up of both (first-call costs: allocator, lazy imports, tqdm)
        fit_loop(cfg, data, accelerator)
        for r in range(args.repeats):
            order = ("plain", "fit") if r % 2 == 0 else ("fit", "plain")
            states = {}
            for which in order:
                if which == "plain":
                    states["plain"], clock = plain_loop(cfg, data)
                    plain.append(clock.per_step())
                else:
                    states["fit"], clock, call = fit_loop(cfg, data, accelerator)
                    fitted.append(clock.per_step())
                    whole.append(call)
            diffs.append(max_difference(states["plain"], states["fit"]))
            print(f"  repeat {r} ({' then '.join(order)}): wall / CPU s per step: plain {plain[-1][0]:.4f} / "
                  f"{plain[-1][1]:.4f}, fit {fitted[-1][0]:.4f} / {fitted[-1][1]:.4f}; max |weight diff| {diffs[-1]:.3g}",
                  flush=True)
    res: dict[str, Any] = {"steps": args.steps, "threads": torch.get_num_threads(), "max weight diff": max(diffs),
                           "same weights": max(diffs) == 0.0, "fit call wall s/step": whole,
                           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for i, kind in enumerate(("wall", "cpu")):
        p, f = [x[i] for x in plain], [x[i] for x in fitted]
        res[f"plain {kind} s/step"], res[f"fit {kind} s/step"] = p, f
        res[f"overhead {kind} %"] = 100 * (statistics.median(f) - statistics.median(p)) / statistics.median(p)
    return res


def markdown(res: dict[str, Any]) -> str:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.4f} ({' / '.join(f'{v:.4f}' for v in values)})"

    return "\n".join([
        "| loop | CPU s/step: median (per repeat) | wall s/step: median (per repeat) |",
        "|---|---:|---:|",
        f"| plain PyTorch | {cell(res['plain cpu s/step'])} | {cell(res['plain wall s/step'])} |",
        f"| engine.fit | {cell(res['fit cpu s/step'])} | {cell(res['fit wall s/step'])} |",
        f"| fit overhead | {res['overhead cpu %']:+.1f}% | {res['overhead wall %']:+.1f}% |"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run_benchmark(args)
    same = "identical" if res["same weights"] else f"differ (max |diff| {res['max weight diff']:.3g})"
    print(f"\n{markdown(res)}\n\nfinal weights and BN statistics of the two loops: {same}; "
          f"{args.steps} steps x batch {args.batch_size}, width {args.width}, {res['threads']} thread(s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
