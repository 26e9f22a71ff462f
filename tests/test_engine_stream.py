"""fit on a BatchStream (a training set read as a stream): the same run as the map-style dataset it
streams, an exact resume mid-epoch, and clear errors. Tiny CPU models, one thread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mhe_scale.config import OptimConfig
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import build_optimizer, fit
from mhe_scale.parallel.testing import finish_ranks
from mhe_scale.data.samplers import epoch_permutation
from mhe_scale.engine.stream import BatchStream, StreamTooShortError

from test_engine_loop import REPO, flat_params, read_log, tiny_data, tiny_model, train_cfg


class TensorStream(BatchStream):
    """The rows of a SyntheticSplit in the (seed, epoch) permutation, dealt round-robin to the ranks."""

    def __init__(self, data: SyntheticSplit, declared_rows: int | None = None) -> None:
        super().__init__()
        self.data, self.declared_rows = data, declared_rows
        self.batches_made = 0

    def __len__(self) -> int:
        return self.declared_rows or len(self.data)

    def batches(self, epoch, rank, world, micro_batch, seed):
        order = epoch_permutation(len(self.data), seed, epoch)[rank::world]
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            self.batches_made += 1
            idx = order[start:start + micro_batch]
            yield self.data.inputs[idx], self.data.targets[idx]


def train(data, out: Path, callback=None, **cfg):
    model = tiny_model("mhp", dropout=0.2)
    optimizer = build_optimizer(OptimConfig(lr=5e-3), model)
    result = fit(model, optimizer, data, train_cfg(**cfg), Accelerator(cpu=True), out_dir=out, step_callback=callback)
    return result, model


def test_stream_trains_exactly_like_the_indexed_dataset(tmp_path):
    data = tiny_data(100)
    indexed, model_a = train(data, tmp_path / "indexed", epochs=2.5, grad_accum_steps=2, batch_size=8)
    streamed, model_b = train(TensorStream(data), tmp_path / "streamed", epochs=2.5, grad_accum_steps=2, batch_size=8)
    assert indexed.steps == streamed.steps == 15  # 100 // 16 = 6 steps per epoch, x 2.5
    assert read_log(tmp_path / "streamed" / "loss_log.jsonl") == read_log(tmp_path / "indexed" / "loss_log.jsonl")
    assert torch.equal(flat_params(model_a), flat_params(model_b))


class Interrupt(Exception):
    pass


def stop_then_resume(data, out: Path, stop: int, **cfg):
    """Train until `stop` raises after step `stop`, then resume with a fresh stream -> (result, model, stream)."""
    def interrupt(step: int) -> None:
        if step == stop:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(TensorStream(data), out, interrupt, **cfg)
    stream = TensorStream(data)
    result, model = train(stream, out, **cfg)
    return result, model, stream


def test_resume_mid_epoch_replays_the_stream_to_the_same_run(tmp_path):
    data = tiny_data(100)
    cfg = dict(epochs=2.0, batch_size=8, save_every=4, resume="auto")  # 12 steps per epoch, 24 in all
    _, reference = train(TensorStream(data), tmp_path / "ref", **cfg)
    # stopped at epoch 1, batch 3; the newest checkpoint is step 12 (= epoch 1, batch 0)
    result, resumed, stream = stop_then_resume(data, tmp_path / "run", 15, **cfg)
    assert result.resumed_from == 12 and result.steps == 12
    assert stream.batches_made == 12  # epoch 1 read once, from its start: nothing skipped at step 12
    assert read_log(tmp_path / "run" / "loss_log.jsonl") == read_log(tmp_path / "ref" / "loss_log.jsonl")
    assert torch.equal(flat_params(resumed), flat_params(reference))


def test_resume_inside_an_epoch_skips_what_was_trained(tmp_path):
    cfg = dict(epochs=1.0, batch_size=8, save_every=5, resume="auto")  # 12 steps, checkpoint at 5
    result, _, stream = stop_then_resume(tiny_data(100), tmp_path / "run", 7, **cfg)
    assert result.resumed_from == 5 and result.steps == 7
    assert stream.batches_made == 12  # batches 0-4 read again and dropped, 5-11 trained


def test_a_stream_shorter_than_declared_names_epoch_and_rank(tmp_path):
    with pytest.raises(StreamTooShortError, match=r"ended after 6 micro-batches of 16 rows in epoch 0 on rank 0"):
        train(TensorStream(tiny_data(100), declared_rows=160), tmp_path, batch_size=16)


def test_stream_refuses_several_loader_workers(tmp_path):
    with pytest.raises(ValueError, match="num_workers=2.*repeating its rows"):
        train(TensorStream(tiny_data(100)), tmp_path, num_workers=2)


# ---------------------------------------------------------------- two processes (gloo, DDP)
def child_two_ranks(out: str) -> None:
    """Under torchrun: each rank reads its own rows of the stream; DDP averages the gradients."""
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    model = tiny_model("mhp")
    optimizer = build_optimizer(OptimConfig(lr=5e-3), model)
    fit(model, optimizer, TensorStream(tiny_data(100)), train_cfg(epochs=2.0, batch_size=8), acc, out_dir=out)
    Path(f"{out}/params-{acc.process_index}.json").write_text(json.dumps(flat_params(model).tolist()))
    finish_ranks()


def test_two_ranks_read_disjoint_rows_and_train_like_one_process_with_their_union(tmp_path):
    # rank r reads positions r, r + 2, ... of the epoch's order in micro-batches of 8, so step j of
    # the two ranks covers positions [16 j, 16 j + 16): the batch of one process at batch size 16
    model = tiny_model("mhp")
    fit(model, build_optimizer(OptimConfig(lr=5e-3), model), TensorStream(tiny_data(100)),
        train_cfg(epochs=2.0, batch_size=16), Accelerator(cpu=True), out_dir=tmp_path / "one")
    script = tmp_path / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      f"from test_engine_stream import child_two_ranks; child_two_ranks({str(tmp_path / 'two')!r})\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29950 + hash(str(tmp_path)) % 40), str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_log(tmp_path / "one" / "loss_log.jsonl"), read_log(tmp_path / "two" / "loss_log.jsonl")
    assert [r["step"] for r in two] == list(range(1, 13))  # 100 // 16 = 6 steps per epoch
    torch.testing.assert_close(torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    ranks = [torch.tensor(json.loads((tmp_path / "two" / f"params-{r}.json").read_text())) for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    torch.testing.assert_close(ranks[0], flat_params(model), rtol=1e-4, atol=1e-5)
