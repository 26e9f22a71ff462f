"""MoCo / KCL training module: split BN equals per-sub-batch BN, the momentum update, the FIFO queue
(and its divisibility error), an interrupted run resumes to the uninterrupted one exactly (queue,
key encoder, generator restored), and the contrastive task end to end on 1 and 2 processes."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhe_scale.parallel.testing import free_port
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.engine import fit
from mhe_scale.engine.model import make_optimizer
from mhe_scale.models.image import build_image_backbone
from mhe_scale.models.moco import MoCo, SplitBatchNorm2d

REPO = Path(__file__).resolve().parents[1]


def test_split_bn_equals_bn_on_each_sub_batch():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn.weight.data.uniform_(0.5, 2), bn.bias.data.normal_()
    split = SplitBatchNorm2d(3, 4, momentum=0.3)
    split.load_state_dict(bn.state_dict())
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = split(x)
    refs, stats = [], []
    for chunk in x.chunk(4):  # four processes, each with its own BN over 2 contiguous samples
        one = copy.deepcopy(bn)
        refs.append(one(chunk))
        stats.append((one.running_mean, one.running_var))
    torch.testing.assert_close(out, torch.cat(refs))
    torch.testing.assert_close(split.running_mean, torch.stack([s[0] for s in stats]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([s[1] for s in stats]).mean(0))
    split.eval(), bn.eval()
    torch.testing.assert_close(split(x), nn.BatchNorm2d.forward(split, x))


def tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    backbone = build_image_backbone("resnet18", stem="cifar", width=4)
    return MoCo(backbone, **(dict(dim=8, queue_size=16, momentum=0.9, temperature=0.2, k_positives=2, split_bn=2) | kw))


def test_momentum_update_and_fifo_queue():
    m = tiny_moco()
    key_before = [p.clone() for p in m.key_encoder.parameters()]
    for p in m.encoder.parameters():
        p.data.add_(1.0)
    m.after_optimizer_step(1)
    query = list(m.encoder.parameters()) + list(m.projector.parameters())
    for kb, k, q in zip(key_before, m.key_encoder.parameters(), query):
        torch.testing.assert_close(k, 0.9 * kb + 0.1 * q)
    views = torch.randn(4, 2, 3, 8, 8)
    for step in range(5):
        m(views, torch.full((4,), step))
    # 5 micro-batches of 4 keys into 16 slots: slots 0..3 hold the 5th batch, 4..15 the 2nd..4th
    assert m.queue_labels.tolist() == [4] * 4 + [1] * 4 + [2] * 4 + [3] * 4 and m.pointer == 4
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(16))
    with pytest.raises(ValueError, match="queue_size=16 is not divisible by the 3 keys"):
        tiny_moco(split_bn=1)(torch.randn(3, 2, 3, 8, 8), torch.zeros(3, dtype=torch.long))


class Views(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 2, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Crash(Exception):
    pass


def train(out: Path, crash_at: int = 0) -> MoCo:
    m = tiny_moco()
    cfg = TrainConfig(epochs=2.0, batch_size=4, log_every=1, save_every=3, keep_last=0, seed=0, output_dir=str(out))

    def stop(step):
        if step == crash_at:
            raise Crash

    opt = make_optimizer(OptimConfig(name="sgd", lr=0.05), [{"params": list(m.parameters())}])
    fit(m, opt, Views(), cfg, Accelerator(cpu=True), out_dir=out, step_callback=stop)
    return m


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    whole = train(tmp_path / "whole")
    with pytest.raises(Crash):
        train(tmp_path / "resumed", crash_at=5)  # checkpoint at step 3, killed after step 5
    resumed = train(tmp_path / "resumed")
    log = lambda p: [json.loads(l)["loss"] for l in (p / "loss_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "whole") == log(tmp_path / "resumed") and len(log(tmp_path / "whole")) == 16
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole.key_encoder.state_dict().values(), resumed.key_encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(whole.queue, resumed.queue) and torch.equal(whole.queue_labels, resumed.queue_labels)
    assert torch.equal(whole.generator.get_state(), resumed.generator.get_state())


def test_resume_on_another_number_of_processes_reads_rank_mod_saved_world(tmp_path, caplog):
    saved = []
    for rank in (0, 1):  # two processes' files; rank 1's queue made different to see which file is read
        m = tiny_moco(rank=rank, world=2)
        m.queue = torch.randn(m.queue.shape, generator=torch.Generator().manual_seed(rank))
        m.queue_labels = torch.full_like(m.queue_labels, rank)
        m.pointer = 8
        m.extra_state()[0].save(tmp_path)
        saved.append(m)

    def resumed(rank: int, world: int) -> MoCo:
        m = tiny_moco(rank=rank, world=world)
        m.extra_state()[0].load(tmp_path)
        return m

    one = resumed(0, 1)
    assert "saved by 2 processes, resumed on 1" in caplog.text
    assert torch.equal(one.queue, saved[0].queue) and one.pointer == 8 and (one.queue_labels == 0).all()
    for a, b in zip(one.key_encoder.state_dict().values(), saved[0].key_encoder.state_dict().values()):
        assert torch.equal(a, b)
    three = [resumed(r, 3) for r in range(3)]
    assert [int(m.queue_labels[0]) for m in three] == [0, 1, 0]  # rank r reads rank (r mod 2)'s file
    states = [m.generator.get_state() for m in three]
    assert not torch.equal(states[0], states[2])  # same file, yet their own key-shuffle / draw streams
    assert torch.equal(resumed(2, 3).generator.get_state(), states[2])  # and deterministic
    (tmp_path / "moco-rank0-of-3.safetensors").write_bytes(b"")  # two world sizes in one folder: refused
    with pytest.raises(FileNotFoundError, match="no MoCo state for rank 0 of 4"):
        resumed(0, 4)


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    from tests.conftest import load_tool
    from tests.test_longtail_subsets import _archive

    root = tmp_path_factory.mktemp("lt")
    assert load_tool("make_longtail").main(["cifar10", "--archive", str(_archive(root / "a.tar.gz", per_class=16)),
                                            "--out", str(root / "lists"), "--ratios", "4"]) == 0
    return root / "lists"


def overrides(lists: Path, out: Path, *extra: str) -> list[str]:
    return ["task=contrastive", "data.format=list", f"data.path={lists / 'r4.txt'}", f"data.test_path={lists / 'test.txt'}",
            f"data.root={lists / 'images'}", "model.width=4", "data.image_size=8", "contrastive.queue_size=16", "contrastive.split_bn=2",
            "contrastive.knn_k=5", "train.batch_size=4", "train.epochs=1", "train.log_every=1", "train.save_every=4",
            "train.num_workers=0", "optim.lr=0.01", f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("method", ["kcl", "moco", "ce"])
def test_contrastive_task_one_process(lists, tmp_path, method):
    from mhe_scale.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["configs/longtail/cifar10_lt100_kcl.yaml",
                       *overrides(lists, out, f"contrastive.method={method}")]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert 0 <= metrics["knn_overall"] <= 1
    rows = [json.loads(l) for l in (out / method / "loss_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    if method == "ce":  # the CE net's own classifier is scored too, by shot group
        assert 0 <= metrics["classifier_overall"] <= 1 and "classifier_many" in metrics
    else:
        assert rows[-1]["chance"] == pytest.approx(np.log(17))  # queue of 16 filled after 4 steps
    assert list((out / method / "checkpoints").glob("step-*/model.safetensors"))


def test_contrastive_task_two_processes_share_one_queue(lists, tmp_path):
    out = tmp_path / "run2"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "mhe_scale.train", "configs/longtail/cifar10_lt100_kcl.yaml",
                           *overrides(lists, out, "train.schedule=constant")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpt = sorted((out / "kcl" / "checkpoints").glob("step-*"))[-1]
    r0, r1 = (load_file(str(ckpt / f"moco-rank{r}-of-2.safetensors")) for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and torch.equal(r0["queue_labels"], r1["queue_labels"])
    assert (r0["queue_labels"] >= 0).all()
    keys = [k for k in r0 if k.startswith("key.") and "running" not in k and "num_batches" not in k]
    assert all(torch.equal(r0[k], r1[k]) for k in keys)  # key weights follow the same (averaged) query weights

    # the same run extended by an epoch on ONE process (global batch 8 kept): resumes from the 2-process files
    from mhe_scale.train import main as train_main

    steps = [json.loads(l)["step"] for l in (out / "kcl" / "loss_log.jsonl").read_text().splitlines()]
    assert train_main(["configs/longtail/cifar10_lt100_kcl.yaml", *overrides(lists, out, "train.schedule=constant",
                                                                             "train.epochs=2", "train.batch_size=8")]) == 0
    more = [json.loads(l)["step"] for l in (out / "kcl" / "loss_log.jsonl").read_text().splitlines()]
    assert more[:len(steps)] == steps and more[len(steps):] == list(range(steps[-1] + 1, 2 * steps[-1] + 1))
    last = sorted((out / "kcl" / "checkpoints").glob("step-*"))[-1]
    assert (last / "moco-rank0-of-1.safetensors").is_file()
