"""The training loop: exact kill-and-resume, gradient accumulation, lr schedules, clipping, NaN
detection, EMA, and the deterministic data order. Tiny CPU models, one thread."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import (Classifier, ExponentialMovingAverage, NonFiniteLossError, TrainPlan, build_optimizer,
                              build_scheduler, fit, lr_factor)
from mhe_scale.data.samplers import EpochBatchSampler, epoch_permutation
from mhe_scale.heads import create_head
from mhe_scale.models import MLPEncoder

REPO = Path(__file__).resolve().parents[1]
C, DIM = 30, 12


def tiny_data(n: int = 256, seed: int = 0) -> SyntheticSplit:
    gen = torch.Generator().manual_seed(seed)
    return SyntheticSplit(torch.randn(n, DIM, generator=gen), torch.randint(0, C, (n,), generator=gen))


def tiny_model(head: str = "mhp", dropout: float = 0.0, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    encoder = MLPEncoder(DIM, hidden=24, num_features=16, depth=1, dropout=dropout)
    kwargs = {"num_heads": 2} if head == "mhp" else {}
    return Classifier(encoder, create_head(head, in_features=16, num_classes=C, **kwargs))


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=1.0, batch_size=16, log_every=1, seed=3, output_dir="unused", resume=False)
    return TrainConfig(**(base | kw))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- kill and resume (subprocesses)
CHILD_CFG = dict(epochs=3.0, batch_size=16, grad_accum_steps=2, log_every=4, save_every=5, keep_last=2,
                 schedule="cosine", warmup_steps=2, clip_grad_norm=0.5, ema_decay=0.9, seed=5, resume="auto")


def _child(out_dir: str, kill_at: int) -> None:
    """Run inside a fresh interpreter: train, optionally SIGKILL itself after step kill_at."""
    torch.set_num_threads(1)
    model = tiny_model("mhp", dropout=0.2)  # dropout: the RNG state must be restored too
    optimizer = build_optimizer(OptimConfig(lr=5e-3), model)

    def maybe_die(step: int) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = fit(model, optimizer, tiny_data(200), TrainConfig(**CHILD_CFG, output_dir=out_dir),
                 Accelerator(cpu=True), out_dir=out_dir, step_callback=maybe_die)
    with result.ema.applied():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/final_ema.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/final.safetensors")


def run_child(out_dir: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    code = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_engine_loop as t; " \
           f"t._child({str(out_dir)!r}, {kill_at})"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_sigkill_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # 200 points / (16 x 2) = 6 optimizer steps per epoch, 18 in all; checkpoints at 5, 10, 15, 18;
    # losses are written at log steps 4, 8, 12, 16 and at every save
    _child(str(tmp_path / "ref"), kill_at=0)  # the uninterrupted reference, in this process
    killed = run_child(tmp_path / "run", kill_at=13)  # dies mid-epoch 2, 3 steps after the step-10 save
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010"]  # keep_last=2
    assert read_log(tmp_path / "run" / "loss_log.jsonl")[-1]["step"] == 12  # steps 11, 12 get redone
    resumed = run_child(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-00000010" in resumed.stdout

    want, got = read_log(tmp_path / "ref" / "loss_log.jsonl"), read_log(tmp_path / "run" / "loss_log.jsonl")
    assert [r["step"] for r in want] == list(range(1, 19))
    assert got == want  # loss, lr, grad norm and epoch of every step, bit for bit
    for name in ("final.safetensors", "final_ema.safetensors"):
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WorkerStampedData(torch.utils.data.Dataset):
    """tiny_data that notes in a file which loader worker built each point ('main' if none)."""

    def __init__(self, data: SyntheticSplit, stamp: Path) -> None:
        self.data, self.stamp = data, stamp

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        info = torch.utils.data.get_worker_info()
        with open(self.stamp, "a") as f:
            f.write(f"{'main' if info is None else info.id}\n")
        return self.data[i]


def test_loader_workers_change_nothing_but_who_builds_the_batches(tmp_path):
    runs = {}
    for workers in (0, 2):
        model = tiny_model("mhp", dropout=0.2)
        optimizer = build_optimizer(OptimConfig(lr=5e-3), model)
        cfg = train_cfg(epochs=2.5, num_workers=workers)  # three loader passes, the last one cut short
        data = WorkerStampedData(tiny_data(100), tmp_path / f"stamp{workers}")
        fit(model, optimizer, data, cfg, Accelerator(cpu=True), out_dir=tmp_path / f"w{workers}")
        runs[workers] = (read_log(tmp_path / f"w{workers}" / "loss_log.jsonl"), flat_params(model))
    assert set((tmp_path / "stamp0").read_text().split()) == {"main"}
    assert set((tmp_path / "stamp2").read_text().split()) == {"0", "1"}
    assert [r["step"] for r in runs[0][0]] == list(range(1, 16))
    assert runs[2][0] == runs[0][0]
    assert torch.equal(runs[2][1], runs[0][1])


# ---------------------------------------------------------------- gradient accumulation
def test_k_micro_batches_give_the_update_of_one_big_batch(tmp_path):
    data = tiny_data(64)
    results = {}
    for k, b in ((1, 32), (4, 8)):
        model = tiny_model("mhp")
        optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.5, momentum=0.0), model)
        cfg = train_cfg(batch_size=b, grad_accum_steps=k, epochs=0.5, loss_log=False)  # exactly one step
        assert fit(model, optimizer, data, cfg, Accelerator(cpu=True), out_dir=tmp_path / f"k{k}").steps == 1
        results[k] = flat_params(model)
    # naive reference: one plain SGD step on the mean loss of the same 32 points
    model = tiny_model("mhp")
    before = flat_params(model)
    idx = epoch_permutation(64, 3, 0)[:32]
    model(data.inputs[idx], data.targets[idx])[0].backward()
    reference = before - 0.5 * torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert not torch.allclose(results[1], before)
    torch.testing.assert_close(results[1], reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(results[4], reference, rtol=0, atol=1e-6)


def test_sampler_covers_each_epoch_once_and_resumes_mid_epoch():
    cfg = train_cfg(batch_size=4, grad_accum_steps=2)
    plan = TrainPlan.build(cfg, 50, num_processes=3)  # global batch 24, 2 steps per epoch, 2 dropped
    ranks = [EpochBatchSampler(50, plan.micro_batch, plan.grad_accum_steps, plan.num_processes, plan.steps_per_epoch, r,
                               seed=7) for r in range(3)]
    seen = torch.tensor([i for s in ranks for batch in s for i in batch])
    assert sorted(seen.tolist()) == sorted(epoch_permutation(50, 7, 0)[:48].tolist())
    assert all(len(list(s)) == 4 for s in ranks)  # 2 steps x 2 micro-batches
    full = list(ranks[1])
    ranks[1].set_position(epoch=0, start_step=1)
    assert list(ranks[1]) == full[2:]
    assert not torch.equal(epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 1))


# ---------------------------------------------------------------- schedules
def test_schedule_values_at_known_steps():
    assert [lr_factor(s, 100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, 100, 4, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(52, 100, 4, "cosine", 0.0) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(100, 100, 4, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(250, 100, 4, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(52, 100, 4, "poly", 0.0, poly_power=2.0) == pytest.approx(0.25)
    assert lr_factor(28, 100, 4, "poly", 0.2, poly_power=1.0) == pytest.approx(0.2 + 0.8 * 0.75)
    assert lr_factor(100, 100, 0, "poly", 0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(5, 100, 0, "linear")


def test_scheduler_drives_each_group_and_fit_logs_the_lr_used(tmp_path):
    model = tiny_model("fc")
    optimizer = build_optimizer(OptimConfig(lr=1e-2, head_lr=1e-1), model)
    scheduler = build_scheduler(optimizer, 10, warmup_steps=2, schedule="cosine")
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-3, 5e-2])
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 1e-1])

    model = tiny_model("fc")
    optimizer = build_optimizer(OptimConfig(lr=1e-2), model)
    cfg = train_cfg(schedule="poly", warmup_steps=3, min_lr_ratio=0.1, loss_log=True)
    fit(model, optimizer, tiny_data(160), cfg, Accelerator(cpu=True), out_dir=tmp_path)
    rows = read_log(tmp_path / "loss_log.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 * lr_factor(s, 10, 3, "poly", 0.1) for s in range(10)])


# ---------------------------------------------------------------- clipping, NaN, EMA
def test_clipping_bounds_the_update(tmp_path):
    data, moved = tiny_data(64), {}
    for clip in (None, 1e-3):
        model = tiny_model("fc")
        before = flat_params(model)
        optimizer = build_optimizer(OptimConfig(name="sgd", lr=1.0, momentum=0.0), model)
        cfg = train_cfg(batch_size=32, epochs=0.5, clip_grad_norm=clip, loss_log=True)
        fit(model, optimizer, data, cfg, Accelerator(cpu=True), out_dir=tmp_path / str(clip))
        moved[clip] = float((flat_params(model) - before).norm())
    norm = read_log(tmp_path / "0.001" / "loss_log.jsonl")[0]["grad_norm"]  # the norm before clipping
    assert moved[None] == pytest.approx(norm, rel=1e-4) and norm > 1e-2
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-4)  # SGD lr 1: |update| = clipped grad norm


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_training_naming_the_step(tmp_path, log_every):
    data = tiny_data(160)
    bad = epoch_permutation(160, 3, 0)[2 * 16:3 * 16]  # the samples of optimizer step 3
    data.inputs[bad[0]] = float("nan")
    model = tiny_model("mhp")
    optimizer = build_optimizer(OptimConfig(), model)
    cfg = train_cfg(log_every=log_every, save_every=4, loss_log=True)
    with pytest.raises(NonFiniteLossError, match=r"nan at optimizer step 3 \(epoch 0\)"):
        fit(model, optimizer, data, cfg, Accelerator(cpu=True), out_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_ema_follows_its_formula_and_swaps_weights_for_eval():
    model = torch.nn.Linear(3, 2).double()
    ema = ExponentialMovingAverage(model, decay=0.8)
    shadow = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        shadow = [0.8 * s + 0.2 * p.detach() for s, p in zip(shadow, model.parameters())]
    live = [p.detach().clone() for p in model.parameters()]
    with ema.applied():
        for p, s in zip(model.parameters(), shadow):
            torch.testing.assert_close(p.detach(), s, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    with pytest.raises(ValueError, match="ema_decay"):
        ExponentialMovingAverage(model, decay=1.0)


def test_bad_config_values_name_the_key(tmp_path):
    model = tiny_model("fc")
    optimizer = build_optimizer(OptimConfig(), model)
    for kw, key in (({"grad_accum_steps": 0}, "grad_accum_steps"), ({"resume": "yes"}, "resume"),
                    ({"clip_grad_norm": 0.0}, "clip_grad_norm"), ({"batch_size": 500}, "batch_size"),
                    ({"num_workers": -1}, "num_workers")):
        with pytest.raises(ValueError, match=key):
            fit(model, optimizer, tiny_data(64), train_cfg(**kw), Accelerator(cpu=True), out_dir=tmp_path)


@pytest.mark.parametrize("total,warmup,initial,final", [(100, 30, 0.04, 1e-5), (37, 11, 0.1, 0.01), (10, 3, 0.5, 0.0)])
def test_onecycle_equals_torch_onecyclelr(total, warmup, initial, final):
    """train.schedule=onecycle follows torch.optim.lr_scheduler.OneCycleLR (cosine, no momentum cycling)
    step for step: pct_start = warmup / total, div_factor = 1 / initial, final lr = lr * final."""
    from mhe_scale.engine.schedule import build_scheduler

    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: build_scheduler(o, total, warmup, "onecycle", min_lr_ratio=final, initial_lr_ratio=initial))
    if final == 0.0:  # torch needs a finite final_div_factor: check the end points by hand
        assert ours[0] == pytest.approx(0.5 * initial) and ours[-1] == pytest.approx(0.0, abs=1e-12)
        assert max(ours) == pytest.approx(0.5)
        return
    theirs = lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.5, total_steps=total, pct_start=warmup / total, anneal_strategy="cos", cycle_momentum=False,
        div_factor=1 / initial, final_div_factor=initial / final))
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
