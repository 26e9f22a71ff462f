"""Checkpoints: exact round trip, atomic publication, manifest verification (truncated / corrupted /
half-written folders are skipped or removed), keep-last-N, never unpickling on load, per-process
extra state, and a 2-process DDP (gloo) save + resume. Tiny CPU models."""

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import (Classifier, ExponentialMovingAverage, ExtraState, Progress, TrainingState,
                              build_optimizer, build_scheduler, find_resumable, fit, load_checkpoint, save_checkpoint,
                              verify_checkpoint)
from mhe_scale.engine.checkpoint import find_resumable_everywhere
from mhe_scale.heads import create_head
from mhe_scale.models import MLPEncoder
from mhe_scale.parallel.testing import finish_ranks, free_port

REPO = Path(__file__).resolve().parents[1]
C, DIM = 30, 12


def tiny_model(seed: int = 0, dropout: float = 0.0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(MLPEncoder(DIM, hidden=24, num_features=16, depth=1, dropout=dropout),
                      create_head("mhp", in_features=16, num_classes=C, num_heads=2))


def tiny_data(n: int = 160) -> SyntheticSplit:
    gen = torch.Generator().manual_seed(0)
    return SyntheticSplit(torch.randn(n, DIM, generator=gen), torch.randint(0, C, (n,), generator=gen))


def make_state(optim: str = "adamw", seed: int = 0, steps: int = 0) -> TrainingState:
    model = tiny_model(seed)
    optimizer = build_optimizer(OptimConfig(name=optim, lr=1e-2, head_lr=3e-2, momentum=0.9), model)
    scheduler = build_scheduler(optimizer, 20, warmup_steps=3, schedule="cosine")
    ema = ExponentialMovingAverage(model, 0.9)
    data = tiny_data(32)
    for _ in range(steps):
        model(data.inputs, data.targets)[0].backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.update()
    return TrainingState(model, optimizer, scheduler, ema)


def assert_same(a, b, where="state"):
    """Recursive exact equality that also checks container types (tuples stay tuples)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_round_trip_restores_every_part_exactly(tmp_path, accelerator, optim):
    state = make_state(optim, steps=4)
    progress = Progress(step=4, epoch=1, batch_in_epoch=2, sampler_seed=11)
    folder = save_checkpoint(tmp_path, progress, state, accelerator)
    assert folder.name == "step-00000004" and [p.name for p in tmp_path.iterdir()] == ["step-00000004"]
    after_save = (torch.rand(3), np.random.rand(3), random.random())
    files = {p.name for p in folder.iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng-rank00000.safetensors",
                     "trainer_state.json", "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == files - {"manifest.json"}

    fresh = make_state(optim, seed=1)  # different weights, empty optimizer state, scheduler at 0
    assert load_checkpoint(folder, fresh, accelerator) == progress
    assert_same(fresh.model.state_dict(), state.model.state_dict(), "model")
    assert_same(fresh.optimizer.state_dict(), state.optimizer.state_dict(), "optimizer")
    assert_same(fresh.scheduler.state_dict(), state.scheduler.state_dict(), "scheduler")
    assert_same(fresh.ema.state_dict(), state.ema.state_dict(), "ema")
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [g["lr"] for g in state.optimizer.param_groups]
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], after_save[0]) and np.array_equal(again[1], after_save[1])
    assert again[2] == after_save[2]


def _save_steps(root: Path, steps, accelerator, keep_last: int = 0) -> TrainingState:
    state = make_state(steps=1)
    for s in steps:
        save_checkpoint(root, Progress(s, 0, s, 0), state, accelerator, keep_last=keep_last)
    return state


def test_truncated_or_corrupted_newest_is_skipped_with_a_warning(tmp_path, accelerator, caplog):
    _save_steps(tmp_path, [1, 2, 3], accelerator)
    newest = tmp_path / "step-00000003" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    middle = tmp_path / "step-00000002" / "optimizer.safetensors"
    raw = bytearray(middle.read_bytes())
    raw[-5] ^= 0xFF  # same size, one byte flipped inside a tensor
    middle.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert find_resumable(tmp_path) == tmp_path / "step-00000001"
    text = caplog.text
    assert "step-00000003" in text and "model.safetensors" in text and "truncated" in text
    assert "step-00000002" in text and "SHA-256" in text
    assert "truncated" in verify_checkpoint(tmp_path / "step-00000003")


def test_half_written_tmp_and_manifestless_folders_are_ignored_and_cleaned(tmp_path, accelerator, caplog):
    _save_steps(tmp_path, [2], accelerator)
    tmp = tmp_path / "ckpt-00000009.tmp-4242"  # a save killed mid-write
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    unfinished = tmp_path / "step-00000008"  # e.g. copied by hand without its manifest
    unfinished.mkdir()
    (unfinished / "trainer_state.json").write_text("{}")
    with caplog.at_level("WARNING"):
        assert find_resumable_everywhere(tmp_path, accelerator) == tmp_path / "step-00000002"
    assert not tmp.exists()
    assert "ckpt-00000009.tmp-4242" in caplog.text and "no manifest" in caplog.text
    state = make_state(seed=3)
    save_checkpoint(tmp_path, Progress(8, 0, 8, 0), state, accelerator)  # replaces the unfinished folder
    assert verify_checkpoint(unfinished) is None and find_resumable(tmp_path) == unfinished


def test_keep_last_prunes_oldest(tmp_path, accelerator):
    _save_steps(tmp_path, [1, 2, 3, 4], accelerator, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_loading_never_unpickles(tmp_path, accelerator, monkeypatch):
    state = _save_steps(tmp_path, [5], accelerator)
    folder = tmp_path / "step-00000005"
    torch.save(state.optimizer.state_dict(), folder / "optimizer.pt")  # pickles lying beside the real files
    (folder / "extra.pkl").write_bytes(pickle.dumps({"x": 1}))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = make_state(seed=2)
    assert find_resumable(tmp_path) == folder
    load_checkpoint(folder, fresh, accelerator)
    assert_same(fresh.model.state_dict(), state.model.state_dict())
    for source in (REPO / "mhe_scale" / "engine").glob("*.py"):
        text = source.read_text()
        assert "torch.load" not in text and "import pickle" not in text, source


def test_extra_state_hooks_write_into_the_checkpoint_and_load_back(tmp_path, accelerator):
    seen = []
    extra = ExtraState("shard",
                       save=lambda d: save_file({"w": torch.full((3,), 7.0)}, str(d / "shard-rank00000.safetensors")),
                       load=lambda d: seen.append(load_file(str(d / "shard-rank00000.safetensors"))["w"]))
    folder = save_checkpoint(tmp_path, Progress(1, 0, 1, 0), make_state(), accelerator, extras=[extra])
    assert "shard-rank00000.safetensors" in json.loads((folder / "manifest.json").read_text())["files"]
    load_checkpoint(folder, make_state(seed=1), accelerator, extras=[extra])
    assert torch.equal(seen[0], torch.full((3,), 7.0))


def test_resume_modes(tmp_path, accelerator):
    cfg = dict(epochs=0.5, batch_size=16, save_every=2, seed=0, output_dir="unused", loss_log=False)
    model = tiny_model()
    opt = build_optimizer(OptimConfig(), model)
    with pytest.raises(FileNotFoundError, match="resume=true"):
        fit(model, opt, tiny_data(), TrainConfig(**cfg, resume=True), accelerator, out_dir=tmp_path)
    assert fit(model, opt, tiny_data(), TrainConfig(**cfg, resume=False), accelerator, out_dir=tmp_path).steps == 5
    with pytest.raises(FileExistsError, match="resume=auto"):
        fit(model, opt, tiny_data(), TrainConfig(**cfg, resume=False), accelerator, out_dir=tmp_path)
    model = tiny_model()
    again = fit(model, build_optimizer(OptimConfig(), model), tiny_data(), TrainConfig(**cfg, resume="auto"),
                accelerator, out_dir=tmp_path)
    assert again.steps == 0 and again.resumed_from == 5


# ---------------------------------------------------------------- 2 processes, DDP over gloo
DDP_CFG = dict(epochs=1.0, batch_size=8, log_every=2, save_every=4, keep_last=0, seed=1, output_dir="unused",
               schedule="cosine", warmup_steps=2)


def ddp_child(out: str) -> None:
    """Under torchrun: a run whose ranks see different output folders is refused at the start; run A
    trains 10 steps saving at 4, 8, 10; run B resumes from A's step 4."""
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    model = tiny_model()
    try:  # as if rank 1 were on another node with its own local disk
        fit(model, build_optimizer(OptimConfig(), model), tiny_data(), TrainConfig(**DDP_CFG, resume=False), acc,
            out_dir=f"{out}/node-local-{rank}")
    except RuntimeError as err:
        assert re.search(r"processes: rank 1 on \S+ cannot read", str(err)) and "train.output_dir" in str(err), err
    else:
        raise AssertionError("a folder rank 1 cannot see was not detected")
    loaded = []
    extra = ExtraState("shard",
                       save=lambda d: save_file({"w": torch.full((2,), float(rank))},
                                                str(d / f"shard-rank{rank:05d}.safetensors")),
                       load=lambda d: loaded.append(float(load_file(str(d / f"shard-rank{rank:05d}.safetensors"))["w"][0])))
    cfg = DDP_CFG
    model = tiny_model(dropout=0.2)
    fit(model, build_optimizer(OptimConfig(), model), tiny_data(), TrainConfig(**cfg, resume=False), acc,
        out_dir=f"{out}/a", extra_state=[extra])
    if acc.is_main_process:
        shutil.copytree(f"{out}/a/checkpoints/step-00000004", f"{out}/b/checkpoints/step-00000004")
    acc.wait_for_everyone()
    model = tiny_model(dropout=0.2)
    result = fit(model, build_optimizer(OptimConfig(), model), tiny_data(), TrainConfig(**cfg, resume=True), acc,
                 out_dir=f"{out}/b", extra_state=[extra])
    assert result.resumed_from == 4 and loaded == [float(rank)], (result, loaded)
    finish_ranks()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """The folders of ddp_child's runs (one torchrun launch shared by the tests below)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      "from test_engine_checkpoint import ddp_child; ddp_child(sys.argv[1])\n")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return tmp_path


def test_two_process_ddp_saves_once_and_resumes_exactly(ddp_run):
    tmp_path = ddp_run
    step4 = tmp_path / "a" / "checkpoints" / "step-00000004"
    files = set(json.loads((step4 / "manifest.json").read_text())["files"])
    assert {"rng-rank00000.safetensors", "rng-rank00001.safetensors", "shard-rank00000.safetensors",
            "shard-rank00001.safetensors", "model.safetensors"} <= files
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == \
        ["step-00000004", "step-00000008", "step-00000010"]  # one folder per step: written once, not per rank
    log_a = [json.loads(line) for line in (tmp_path / "a" / "loss_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == list(range(1, 11))
    assert log_b == log_a[4:]


def test_two_processes_to_one_keeps_the_global_batch_or_is_refused(ddp_run, tmp_path, accelerator):
    """2 -> 1 processes: the same per-process batch would halve the global batch (the old code kept
    the step and recomputed the total: more epochs, a jump in the cosine lr) -> refused, naming the
    fix; with batch_size doubled the run continues the same lr curve and stops at the same step."""
    shutil.copytree(ddp_run / "a" / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    model = tiny_model(dropout=0.2)
    with pytest.raises(ValueError, match=r"global batch of 16 \(8 x 2 processes x 1 accumulation\), this run has 8 "
                                         r".*train.batch_size=16"):
        fit(model, build_optimizer(OptimConfig(), model), tiny_data(), TrainConfig(**DDP_CFG, resume=True),
            accelerator, out_dir=tmp_path)
    result = fit(model, build_optimizer(OptimConfig(), model), tiny_data(),
                 TrainConfig(**(DDP_CFG | dict(batch_size=16)), resume=True), accelerator, out_dir=tmp_path)
    assert result.resumed_from == 4 and result.steps == 6
    two = [json.loads(line) for line in (ddp_run / "a" / "loss_log.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["lr"]) for r in one] == [(r["step"], r["epoch"], r["lr"]) for r in two[4:]]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "ema.safetensors",
                                  "rng-rank00000.safetensors"])
@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_an_unreadable_safetensors_file_is_named(tmp_path, accelerator, name, damage):
    """safetensors said only 'Error while deserializing header: ...' (no file); the error names it."""
    _save_steps(tmp_path, [3], accelerator)
    folder = tmp_path / "step-00000003"
    if damage == "pickle":
        (folder / name).write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    else:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / name))}: not a readable safetensors file "
                                         r"\(Error while deserializing header: .*\): the checkpoint is truncated"):
        load_checkpoint(folder, make_state(seed=1), accelerator)


def test_an_extra_state_reading_a_damaged_file_names_the_folder_and_the_part(tmp_path, accelerator):
    from safetensors.torch import load_file as read

    def load(folder: Path) -> None:
        read(str(folder / "part.safetensors"))

    extra = ExtraState("queue", lambda folder: (folder / "part.safetensors").write_bytes(b"\x00" * 7), load)
    state = make_state(steps=1)
    folder = save_checkpoint(tmp_path, Progress(1, 0, 1, 0), state, accelerator, extras=[extra])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))} \(the files of its 'queue' state\): not a "
                                         "readable safetensors file"):
        load_checkpoint(folder, make_state(seed=1), accelerator, [extra])
