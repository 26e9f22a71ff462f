"""Class-sharded sampled heads with row-sparse updates, on 2 gloo processes and on 1:
sparse == dense training through ShardedHeadTraining (global-norm clip, gradient accumulation),
exact resume from per-rank shard files, and a W=2 checkpoint (rows + per-row state) loaded on W=1."""

from __future__ import annotations

import torch

from mhe_scale.engine.prepared import ShardedHeadTraining
from mhe_scale.optim import RowSparseAdamW, RowSparseSGD, refresh_all
from mhe_scale.parallel import all_reduce_sum, get_rank, get_world_size
from mhe_scale.parallel.checkpoint import load_head_shard, save_head_shard
from mhe_scale.parallel.head_rng import load_head_rng, save_head_rng
from mhe_scale.parallel.sharded_fc import ShardedPartialFCHead
from mhe_scale.parallel.sharded_mhc import ShardedMultiHeadCascadeHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead
from mhe_scale.parallel.testing import run_in_processes

D, C, B, ACCUM = 6, 40, 4, 2  # B rows per rank per micro-batch
HEADS = {
    "pfc": (ShardedPartialFCHead, dict(sample_rate=0.2, scale=8.0)),
    "mhs_bu": (ShardedMultiHeadSamplingHead, dict(sizes=(10, 4), mode="batch_union", num_sampled_groups=2,
                                                  cosine=True, margin=(1.0, 0.2, 0.0), scale=8.0)),
    "mhs_ps": (ShardedMultiHeadSamplingHead, dict(sizes=(10, 4), mode="per_sample", num_sampled_groups=2, bias=True)),
    "mhc": (ShardedMultiHeadCascadeHead, dict(sizes=(5, 8), top_k_groups=2, hidden=4)),
}


class _Acc:
    """The three things ShardedHeadTraining.clip_ asks of an accelerator."""

    def __init__(self, group) -> None:
        self.group, self.device, self.num_processes = group, torch.device("cpu"), get_world_size(group)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return all_reduce_sum(t, self.group)


def _training(name: str, group, sparse: bool, kind: str) -> ShardedHeadTraining:
    cls, kwargs = HEADS[name]
    head = cls(D, C, group=group, init_seed=3, grad_scale=1.0, **kwargs).double()
    if sparse:
        head.row_sparse_parameters()
    params = list(head.parameters())
    if kind == "sgd":
        opt = (RowSparseSGD if sparse else torch.optim.SGD)(params, lr=0.3, momentum=0.9, weight_decay=0.02)
    else:
        opt = (RowSparseAdamW if sparse else torch.optim.AdamW)(params, lr=0.03, eps=1e-30, weight_decay=0.1)
    return ShardedHeadTraining(head, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def _steps(training: ShardedHeadTraining, group, first: int, last: int) -> None:
    rank, world = get_rank(group), get_world_size(group)
    for step in range(first, last):
        for micro in range(ACCUM):
            g = torch.Generator().manual_seed(100 * step + micro)
            x = torch.randn(2 * B, D, generator=g, dtype=torch.float64)  # the global batch of W=2
            y = torch.randint(0, C, (2 * B,), generator=g)
            rows = slice(rank * B, (rank + 1) * B) if world == 2 else slice(0, 2 * B)
            (training.head(x[rows], y[rows]).loss / ACCUM).backward()
        training.clip_(_Acc(group), [], 0.05)
        training.step()


def _state(training: ShardedHeadTraining) -> dict:
    return {n: refresh_all(p).detach().clone() for n, p in training.head.named_parameters()}


def sparse_vs_dense(group, directory: str) -> dict:
    out = {}
    for name in HEADS:
        for kind in ("sgd", "adamw"):
            dense, sparse = _training(name, group, False, kind), _training(name, group, True, kind)
            for t in (dense, sparse):
                _steps(t, group, 0, 3)
            folder = f"{directory}/{name}-{kind}-{get_world_size(group)}"
            save_head_shard(folder, sparse.head, sparse.optimizer)
            save_head_rng(folder, sparse.head)
            for t in (dense, sparse):
                _steps(t, group, 3, 6)
            resumed = _training(name, group, True, kind)
            load_head_shard(folder, resumed.head, resumed.optimizer)
            load_head_rng(folder, resumed.head)
            _steps(resumed, group, 3, 6)
            out[f"{name}-{kind}"] = {"dense": _state(dense), "sparse": _state(sparse), "resumed": _state(resumed)}
    return out


def _check(result: dict) -> None:
    for key, r in result.items():
        for n in r["dense"]:
            torch.testing.assert_close(r["sparse"][n], r["dense"][n], rtol=1e-6, atol=1e-9, msg=f"{key} {n}")
            torch.testing.assert_close(r["resumed"][n], r["sparse"][n], rtol=0, atol=0, msg=f"{key} {n} resume")


def test_sparse_equals_dense_and_resumes_on_two_processes(tmp_path) -> None:
    for result in run_in_processes(sparse_vs_dense, 2, str(tmp_path), timeout_s=300):
        _check(result)
    # the W=2 files (rows, momentum, per-row steps) reshard onto one process
    w1 = _training("pfc", None, True, "sgd")
    load_head_shard(tmp_path / "pfc-sgd-2", w1.head, w1.optimizer)
    state = w1.optimizer.state[w1.head.weight]
    assert state["row_step"].shape == (C,) and state["row_step"].dtype == torch.int64
    assert state["row_step"].eq(3).all() and state["momentum_buffer"].shape == (C, D)


def test_sparse_equals_dense_and_resumes_on_one_process(tmp_path) -> None:
    _check(sparse_vs_dense(None, str(tmp_path)))
