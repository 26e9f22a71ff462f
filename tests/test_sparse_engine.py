"""optim.head_update=sparse through the engine's `fit` (one process, class-sharded head with group=None):
the same loss curve and weights as the dense update (constant lr, accumulation 2, global-norm clip), and a
run stopped after its step-3 checkpoint resumes to the same curve and weights."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import Classifier, fit
from mhe_scale.engine.model import build_optimizers
from mhe_scale.heads import create_head
from mhe_scale.models import MLPEncoder
from mhe_scale.optim import refresh_all
from mhe_scale.parallel.sharded_fc import ShardedPartialFCHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead

C, DIM, FEAT, MICRO, ACCUM, STEPS = 30, 10, 12, 8, 2, 6


def _model(head_name: str) -> Classifier:
    torch.manual_seed(0)
    encoder = MLPEncoder(DIM, hidden=16, num_features=FEAT, depth=1)
    if head_name == "pfc":
        head = ShardedPartialFCHead(FEAT, C, sample_rate=0.2, scale=8.0, group=None)
    else:
        head = ShardedMultiHeadSamplingHead(FEAT, C, sizes=(10, 3), mode="batch_union", num_sampled_groups=2,
                                            bias=True, group=None)
    return Classifier(encoder, head)


def _data() -> SyntheticSplit:
    g = torch.Generator().manual_seed(0)
    n = MICRO * ACCUM * STEPS
    return SyntheticSplit(torch.randn(n, DIM, generator=g), torch.randint(0, C, (n,), generator=g))


def _fit(out, head_name: str, update: str, kind: str, stop_at: int | None = None, resume: bool = False,
         schedule: str = "constant", head_momentum: float | None = None, optimizers: list | None = None):
    model = _model(head_name)
    optim = OptimConfig(name=kind, lr=0.1 if kind == "sgd" else 0.02, momentum=0.9, weight_decay=0.01,
                        head_update=update, head_momentum=head_momentum)
    optimizer, head_optimizer = build_optimizers(optim, model)
    if optimizers is not None:
        optimizers += [optimizer, head_optimizer]
    cfg = TrainConfig(epochs=1.0, batch_size=MICRO, grad_accum_steps=ACCUM, log_every=1, seed=1, keep_last=0,
                      clip_grad_norm=0.3, save_every=3, output_dir=str(out), resume=resume, schedule=schedule,
                      warmup_steps=2 if schedule != "constant" else 0)

    def stop(step: int) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    try:
        fit(model, optimizer, _data(), cfg, Accelerator(cpu=True), head_optimizer=head_optimizer, out_dir=out,
            step_callback=stop)
    except KeyboardInterrupt:
        return None, None
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    return log, {n: refresh_all(p).detach().clone() for n, p in model.head.named_parameters()}


@pytest.mark.parametrize("head_name,kind", [("pfc", "sgd"), ("mhs", "adamw")])
def test_sparse_fit_equals_dense_and_resumes(tmp_path, head_name: str, kind: str) -> None:
    dense_log, dense_w = _fit(tmp_path / "dense", head_name, "dense", kind)
    sparse_log, sparse_w = _fit(tmp_path / "sparse", head_name, "sparse", kind)
    assert max(r["grad_norm"] for r in dense_log) > 0.3  # clipping is active
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in sparse_log]), torch.tensor([r[key] for r in dense_log]),
                                   rtol=1e-5, atol=1e-6)
    # sgd: exact catch-up; adamw with eps=1e-8: eps scaled like sqrt(v) in skipped steps (documented)
    atol = 1e-6 if kind == "sgd" else 1e-4
    for n in dense_w:
        torch.testing.assert_close(sparse_w[n], dense_w[n], rtol=1e-4, atol=atol, msg=n)
    _fit(tmp_path / "resumed", head_name, "sparse", kind, stop_at=4)
    resumed_log, resumed_w = _fit(tmp_path / "resumed", head_name, "sparse", kind, resume=True)
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in sparse_log]
    for n in sparse_w:
        assert torch.equal(resumed_w[n], sparse_w[n]), n


def test_sparse_needs_a_sampled_class_sharded_head() -> None:
    model = Classifier(MLPEncoder(DIM, hidden=16, num_features=FEAT, depth=1),
                       create_head("partial_fc", in_features=FEAT, num_classes=C))
    with pytest.raises(ValueError, match="dist.shard_head=true"):
        build_optimizers(OptimConfig(head_update="sparse"), model)
    with pytest.raises(ValueError, match="head_update"):
        build_optimizers(OptimConfig(head_update="lazy"), model)


def test_auto_is_sparse_for_class_sharded_sampled_heads_only() -> None:
    """The default (auto): row-sparse for sharded partial_fc / mhs, torch's dense optimizer for a replicated
    sampled head and for a sharded full FC (no sampled rows)."""
    from mhe_scale.optim.row_sparse import RowSparseAdamW
    from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead

    assert OptimConfig().head_update == "auto"
    for name in ("pfc", "mhs"):
        _, head_optimizer = build_optimizers(OptimConfig(), _model(name))
        assert isinstance(head_optimizer, RowSparseAdamW), name
    replicated = Classifier(MLPEncoder(DIM, hidden=16, num_features=FEAT, depth=1),
                            create_head("partial_fc", in_features=FEAT, num_classes=C))
    optimizer, head_optimizer = build_optimizers(OptimConfig(), replicated)
    assert head_optimizer is None and type(optimizer) is torch.optim.AdamW
    full = Classifier(MLPEncoder(DIM, hidden=16, num_features=FEAT, depth=1), ShardedFullyConnectedHead(FEAT, C, group=None))
    assert type(build_optimizers(OptimConfig(), full)[1]) is torch.optim.AdamW
    assert type(build_optimizers(OptimConfig(head_update="dense"), _model("pfc"))[1]) is torch.optim.AdamW


def test_sparse_fit_equals_dense_under_the_face_schedule(tmp_path) -> None:
    """Warm-up + poly decay (the face configs' schedule): the lr changes every step, and the skipped rows
    are caught up at each skipped step's own lr (ShardedHeadTraining passes the schedule), so the
    sparse update still equals the dense one; resume is exact."""
    dense_log, dense_w = _fit(tmp_path / "dense", "pfc", "dense", "sgd", schedule="poly")
    sparse_log, sparse_w = _fit(tmp_path / "sparse", "pfc", "sparse", "sgd", schedule="poly")
    assert len({r["lr"] for r in dense_log}) >= 4  # warm-up then decay: the lr moves while rows are skipped
    torch.testing.assert_close(torch.tensor([r["loss"] for r in sparse_log]), torch.tensor([r["loss"] for r in dense_log]),
                               rtol=1e-5, atol=1e-6)
    for n in dense_w:
        torch.testing.assert_close(sparse_w[n], dense_w[n], rtol=1e-4, atol=1e-6, msg=n)
    _fit(tmp_path / "resumed", "pfc", "sparse", "sgd", stop_at=4, schedule="poly")
    resumed_log, resumed_w = _fit(tmp_path / "resumed", "pfc", "sparse", "sgd", resume=True, schedule="poly")
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in sparse_log]
    for n in sparse_w:
        assert torch.equal(resumed_w[n], sparse_w[n]), n


def test_head_momentum_zero_keeps_no_momentum_state_and_sparse_equals_dense(tmp_path) -> None:
    """optim.head_momentum=0: the head's SGD keeps no momentum buffer (row-sparse: its state is the int64
    step counter per row), the encoder keeps optim.momentum; sparse still equals dense (plain SGD catch-up)."""
    dense_opts, sparse_opts = [], []
    dense_log, dense_w = _fit(tmp_path / "dense", "pfc", "dense", "sgd", head_momentum=0.0, optimizers=dense_opts)
    sparse_log, sparse_w = _fit(tmp_path / "sparse", "pfc", "sparse", "sgd", head_momentum=0.0, optimizers=sparse_opts)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in sparse_log]), torch.tensor([r["loss"] for r in dense_log]),
                               rtol=1e-5, atol=1e-6)
    for n in dense_w:
        torch.testing.assert_close(sparse_w[n], dense_w[n], rtol=1e-4, atol=1e-6, msg=n)
    momentum_log, _ = _fit(tmp_path / "momentum", "pfc", "sparse", "sgd")
    assert [r["loss"] for r in momentum_log] != [r["loss"] for r in sparse_log]  # the knob changes training
    encoder_opt, head_opt = sparse_opts
    (state,) = head_opt.state.values()
    assert set(state) == {"step", "row_step"} and state["row_step"].shape == (C,)
    assert all("momentum_buffer" in s for s in encoder_opt.state.values()) and encoder_opt.state
    assert dense_opts[1].param_groups[0]["momentum"] == 0.0 and not any(
        "momentum_buffer" in s and s["momentum_buffer"] is not None for s in dense_opts[1].state.values())
    replicated = Classifier(MLPEncoder(DIM, hidden=16, num_features=FEAT, depth=1),
                            create_head("partial_fc", in_features=FEAT, num_classes=C))
    optimizer, _ = build_optimizers(OptimConfig(name="sgd", head_momentum=0.0), replicated)
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.0]
    with pytest.raises(ValueError, match="head_momentum=0.0 is an sgd setting"):
        build_optimizers(OptimConfig(name="adamw", head_momentum=0.0), _model("pfc"))
