"""The memory model's terms against DeepSpeed's estimators, real heads built on the meta device, and closed forms."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from mhe_scale.plan.memory import (ActivationLine, EngineSpec, HeadSpec, RunSpec, backbone_states, bucket_terms,
                                   catch_up_copies, estimate, head_logit_shape, head_params, head_terms)


def device_sum(terms) -> float:
    return sum(t.device for t in terms)


@pytest.mark.parametrize("psi,gpus,nodes", [(1.3e9, 8, 1), (25e6, 8, 2), (7e9, 4, 1), (2e8, 1, 1)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed_estimator(psi, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(int(psi), gpus, nodes, cpu_offload=offload)
    engine = EngineSpec(zero_stage=2, precision="bf16", optimizer="adam", offload_optimizer=offload)
    ours = device_sum(backbone_states(psi, 0, engine, gpus * nodes))
    assert ours == pytest.approx(gpu, rel=0.01)


@pytest.mark.parametrize("psi,largest,gpus,nodes", [(1.3e9, 5e7, 8, 1), (25e6, 2.4e6, 8, 2), (7e9, 2e8, 16, 1)])
@pytest.mark.parametrize("offload,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_matches_deepspeed_estimator(psi, largest, gpus, nodes, offload, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(int(psi), int(largest), gpus, nodes, cpu_offload=offload,
                                                      cpu_offload_params=offload_param)
    engine = EngineSpec(zero_stage=3, precision="bf16", optimizer="adamw", offload_optimizer=offload,
                        offload_param=offload_param)
    assert device_sum(backbone_states(psi, largest, engine, gpus * nodes)) == pytest.approx(gpu, rel=0.01)


def test_all_cold_tables_agree(capsys):
    """The printed tables of DeepSpeed's *_all_cold estimators (GB per GPU) within 1%."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    psi, largest = 3e9, 1e8
    estimate_zero2_model_states_mem_needs_all_cold(int(psi), num_gpus_per_node=8)
    estimate_zero3_model_states_mem_needs_all_cold(int(psi), int(largest), num_gpus_per_node=8)
    rows = [line for line in capsys.readouterr().out.splitlines() if "offload" in line and "|" in line]
    gb = {}
    for line in rows:
        cpu, gpu, options = [x.strip() for x in line.split("|")]
        gb[options] = float(re.sub("GB", "", gpu)) * 2 ** 30
    ours = {"offload_optimizer=none": backbone_states(psi, largest, EngineSpec(zero_stage=2, precision="bf16"), 8)}
    assert device_sum(ours["offload_optimizer=none"]) == pytest.approx(gb["offload_optimizer=none"], rel=0.01)
    for offload in (False, True):
        z3 = EngineSpec(zero_stage=3, precision="bf16", offload_optimizer=offload)
        key = next(k for k in gb if "offload_param=none" in k and ("offload_optimizer=none" in k) != offload)
        assert device_sum(backbone_states(psi, largest, z3, 8)) == pytest.approx(gb[key], rel=0.01)


def test_closed_forms_sgd_fp32_ddp():
    psi, n = 1_000_000, 4
    # ZeRO-1 bf16 SGD momentum: 2 params + 2 grads + (4 master + 4 fp32 grads + 4 momentum) / N
    z1 = EngineSpec(zero_stage=1, precision="bf16", optimizer="sgd", momentum=0.9)
    assert device_sum(backbone_states(psi, 0, z1, n)) == 4_000_000 + 12_000_000 / 4
    # plain SGD has no state
    z1_plain = EngineSpec(zero_stage=1, precision="bf16", optimizer="sgd", momentum=0.0)
    assert device_sum(backbone_states(psi, 0, z1_plain, n)) == 4_000_000 + 8_000_000 / 4
    # one process without DeepSpeed, fp32 AdamW: 4 + 4 + 8 bytes per parameter
    assert device_sum(backbone_states(psi, 0, EngineSpec(), 1)) == 16_000_000
    # fp32 ZeRO-2 Adam: params 4 whole, grads 4/N, master 4/N, fp32 grads 4/N, Adam 8/N
    z2 = EngineSpec(zero_stage=2, precision="fp32")
    assert device_sum(backbone_states(psi, 0, z2, n)) == 4_000_000 + 20_000_000 / 4


def test_buckets_doubled_with_overlap_and_capped_on_cpu():
    big = EngineSpec(zero_stage=2, precision="bf16", reduce_bucket_size=1e8, allgather_bucket_size=1e7)
    assert device_sum(bucket_terms(1e9, big)) == 2e8
    assert device_sum(bucket_terms(1e9, EngineSpec(zero_stage=2, precision="bf16", reduce_bucket_size=1e8,
                                                   allgather_bucket_size=0, overlap_comm=True))) == 4e8
    cpu = EngineSpec(zero_stage=2, precision="fp32", reduce_bucket_size=5e8, allgather_bucket_size=5e8, device="cpu")
    assert device_sum(bucket_terms(1000, cpu)) == 4000
    assert bucket_terms(1000, EngineSpec()) == []


def _meta_head(name: str, c: int, d: int, **kw):
    from mhe_scale.heads import create_head

    with torch.device("meta"):
        return create_head(name, in_features=d, num_classes=c, **kw)


@pytest.mark.parametrize("name,kw,spec", [
    ("fc", {}, {}),
    ("fc", {"cosine": True}, {"cosine": True}),
    ("partial_fc", {"sample_rate": 0.2}, {"sample_rate": 0.2}),
    ("mhp", {"sizes": [40, 26]}, {"sizes": (40, 26)}),
    ("mhp", {"sizes": [10, 11, 10]}, {"sizes": (10, 11, 10)}),
    ("mhs", {"sizes": [40, 26]}, {"sizes": (40, 26)}),
    ("mhc", {"sizes": [40, 26], "hidden": 32}, {"sizes": (40, 26), "hidden": 32}),
    ("mhc", {"sizes": [8, 10, 13], "hidden": 16, "label_bias": False}, {"sizes": (8, 10, 13), "hidden": 16,
                                                                        "label_bias": False}),
])
def test_head_params_equal_real_heads(name, kw, spec):
    c, d = 1033, 24
    real = sum(p.numel() for p in _meta_head(name, c, d, **kw).parameters())
    assert head_params(HeadSpec(name, c, d, **spec)) == real


@pytest.mark.parametrize("name,items", [("fc", 1033), ("partial_fc", 1033), ("mhs", 40)])
def test_sharded_params_are_rank0_share(name, items):
    from mhe_scale.parallel.shard import shard_range

    world, d = 3, 24
    spec = HeadSpec(name, 1033, d, sizes=(40, 26) if name == "mhs" else None, sharded=True, bias=False)
    share = shard_range(items, 0, world)[1]
    assert head_params(spec, world) == share * (26 if name == "mhs" else 1) * d


def test_sharded_mhc_table_is_split():
    """Sharded MHC splits only the last level's label table (hidden + bias per label)."""
    from mhe_scale.parallel.shard import shard_range

    c, d, h = 1033, 24, 32
    full = HeadSpec("mhc", c, d, sizes=(40, 26), hidden=h)
    split = HeadSpec("mhc", c, d, sizes=(40, 26), hidden=h, sharded=True)
    assert head_params(full) - head_params(split, 4) == (c - shard_range(c, 0, 4)[1]) * (h + 1)


def test_logits_of_sharded_fc_use_global_rows_and_local_columns():
    spec = HeadSpec("fc", 1000, 16, sharded=True)
    assert head_logit_shape(spec, 4, 8) == (32, 250, 0)
    terms = {t.name: t.device for t in head_terms(spec, EngineSpec(optimizer="sgd"), 4, 8)}
    assert terms["head logits"] == 2 * 4 * 32 * 250  # sharded_cross_entropy: softmax in place + its gradient
    assert terms["gathered features"] == 2 * 4 * 32 * 16
    assert terms["head optimizer"] == 4 * 250 * 17


def test_replicated_head_joins_engine_params():
    head = HeadSpec("mhp", 10_000, 64, sizes=(100, 100))
    run = RunSpec(1e6, 1e5, EngineSpec(), head, world=1, micro_batch=4, activations=ActivationLine(0, 10))
    b = estimate(run)
    assert b.get("params").device == 4 * (1e6 + 200 * 64 + 200)
    assert b.get("activations").device == 40
    assert "head params" not in {t.name for t in b.terms}


def test_bad_specs_name_the_fix():
    with pytest.raises(ValueError, match="offload_param needs ZeRO-3"):
        EngineSpec(zero_stage=2, offload_param=True)
    with pytest.raises(ValueError, match="optim.name"):
        EngineSpec(optimizer="lamb")


@pytest.mark.parametrize("name,extra", [("partial_fc", {"sample_rate": 0.5}), ("mhs", {"sizes": [10, 6],
                                                                                      "mode": "batch_union"})])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_row_sparse_head_state_equals_the_real_optimizer(name, extra, optimizer):
    """A class-sharded sampled head with optim.head_update=auto (sparse): after real steps, the
    optimizer's state bytes and the head's gradient bytes equal the model's optimizer + row-counter
    and grads terms (no gradient for the O(C) rows)."""
    from mhe_scale.config import HeadConfig, OptimConfig
    from mhe_scale.engine.model import Classifier, build_optimizers
    from mhe_scale.parallel.factory import build_sharded_head

    c, d = 60, 8
    head = build_sharded_head(HeadConfig(name=name, **extra), d, c, False, group=None)
    model = Classifier(torch.nn.Linear(4, d), head)
    model.encoder.forward_features = model.encoder.forward  # a bare Linear as the encoder
    _, head_opt = build_optimizers(OptimConfig(name=optimizer, momentum=0.9), model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, _ = model(torch.randn(12, 4, generator=gen), torch.randint(0, c, (12,), generator=gen))
        loss.backward()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
    loss, _ = model(torch.randn(12, 4, generator=gen), torch.randint(0, c, (12,), generator=gen))
    loss.backward()
    state = sum(v.numel() * v.element_size() for s in head_opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    dense_grads = sum(p.grad.numel() * p.grad.element_size() for p in head.parameters() if p.grad is not None)
    spec = HeadSpec(name, c, d, sizes=tuple(extra.get("sizes", ())) or None, sharded=True, bias=False,
                    sample_rate=extra.get("sample_rate", 1.0), mode=extra.get("mode", "per_sample"), row_sparse=True)
    terms = {t.name: t.device for t in head_terms(spec, EngineSpec(optimizer=optimizer, momentum=0.9), 1, 12)}
    assert state == terms["head optimizer"] + terms["head row counters"]
    assert dense_grads == terms["head grads"] == 0


class _LiveBytes:
    """Peak bytes of tensor storages created inside the block and still alive (a TorchDispatchMode that
    counts each op's new output storages and frees them when their storage object dies)."""

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self
        self.live, self.peak, self.seen = 0, 0, set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                          if isinstance(a, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, torch.Tensor):
                        continue
                    storage = t.untyped_storage()
                    key, n = storage.data_ptr(), storage.nbytes()
                    if key in inputs or key in counter.seen or n == 0:
                        continue
                    counter.seen.add(key)
                    counter.live += n
                    counter.peak = max(counter.peak, counter.live)

                    def free(key=key, n=n):
                        counter.live -= n
                        counter.seen.discard(key)

                    weakref.finalize(storage, free)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_live_bytes_counter_on_a_known_expression():
    a, b = torch.randn(500, 400), torch.randn(500, 400)
    with _LiveBytes() as live:
        c = a * b + a  # a*b and the sum alive together, then a*b dies
        d = c.sqrt()  # c and d
        del c
        e = d * 2
    assert live.peak == 2 * a.numel() * 4 and e.shape == a.shape


@pytest.mark.parametrize("optimizer,momentum", [("adamw", 0.9), ("sgd", 0.9), ("sgd", 0.0)])
def test_catch_up_bytes_equal_the_real_row_sparse_optimizer(optimizer, momentum):
    """refresh_all after a few steps that touched few rows: the real catch-up's peak vs catch_up_bytes."""
    from mhe_scale.optim.row_sparse import RowSparseAdamW, RowSparseSGD
    from mhe_scale.optim.rows import enable_row_sparse, gather_rows, refresh_all
    from mhe_scale.plan.memory import catch_up_bytes

    rows, dim = 20_000, 64
    w = torch.nn.Parameter(torch.randn(rows, dim))
    enable_row_sparse(w)
    opt = (RowSparseAdamW([w], lr=0.01, weight_decay=0.1) if optimizer == "adamw"
           else RowSparseSGD([w], lr=0.1, momentum=momentum, weight_decay=0.1))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        (gather_rows(w, torch.randperm(rows, generator=gen)[:300], unique=True) ** 2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    skipped = int((opt.state[w]["row_step"] < int(opt.state[w]["step"])).sum())
    with _LiveBytes() as live:
        refresh_all(w)
    assert live.peak == pytest.approx(catch_up_bytes(skipped, dim, optimizer, momentum), rel=0.05)


def test_row_sparse_mhc_gather_counts_leaf_and_expansion():
    """A row-sparse MHC gathers its label rows with gather_rows(unique=False) as sharded_mhc does (each row: the
    members of its target's group): leaf [U, h], expansion [n, h] and both gradients at the backward; the
    model's gathered weights (2 n h) + gathered leaf (2 U h, U from the expected distinct groups) hold them."""
    from mhe_scale.optim.rows import enable_row_sparse, gather_rows

    sizes, hidden, b = (400, 50), 32, 256
    spec = HeadSpec("mhc", 20_000, 24, sizes=sizes, hidden=hidden, sharded=True, row_sparse=True)
    terms = head_terms(spec, EngineSpec(), 1, b)
    model = sum(t.device for t in terms if t.name in ("head gathered weights", "head gathered leaf"))
    table = torch.nn.Parameter(torch.randn(20_000, hidden))
    enable_row_sparse(table)
    groups = torch.randint(0, sizes[0], (b,), generator=torch.Generator().manual_seed(0))
    local = groups[:, None] * sizes[1] + torch.arange(sizes[1])  # [b, c_2] the target group's members
    query = torch.randn(b, hidden, requires_grad=True)  # the head's query: bmm then saves the expansion
    with _LiveBytes() as live:
        part = torch.bmm(gather_rows(table, local), query.unsqueeze(2)).squeeze(2)
        part.sum().backward()
    assert live.peak - query.numel() * 4 == pytest.approx(model, rel=0.1)


def test_catch_up_shape_follows_what_each_head_refreshes():
    from mhe_scale.heads.mhs import PREDICT_CHUNK_COLUMNS as HEAD_CHUNK
    from mhe_scale.optim.row_sparse import REFRESH_CHUNK_ROWS as OPTIM_CHUNK
    from mhe_scale.plan.memory import PREDICT_CHUNK_COLUMNS, REFRESH_CHUNK_ROWS, catch_up_shape

    assert PREDICT_CHUNK_COLUMNS == HEAD_CHUNK and REFRESH_CHUNK_ROWS == OPTIM_CHUNK
    pfc = HeadSpec("partial_fc", 1_000_000, 128, sharded=True, sample_rate=0.1, row_sparse=True)
    assert catch_up_shape(pfc, 4, saves=False) == (REFRESH_CHUNK_ROWS, 128)  # refresh_all in predict, in chunks
    mhs = HeadSpec("mhs", 1_000_000, 128, sizes=(1000, 1000), sharded=True, row_sparse=True)
    assert catch_up_shape(mhs, 4, saves=False) == (65 * 1000, 128)  # 65 groups of 1000 per predict chunk
    assert catch_up_shape(mhs, 4, saves=True) == (REFRESH_CHUNK_ROWS, 128)
    mhc = HeadSpec("mhc", 1_000_000, 128, sizes=(1000, 1000), sharded=True, row_sparse=True, hidden=300)
    assert catch_up_shape(mhc, 4, saves=False) == (0, 0) and catch_up_shape(mhc, 4, saves=True) == (REFRESH_CHUNK_ROWS, 300)
    assert catch_up_shape(replace(pfc, row_sparse=False), 4, saves=True) == (0, 0)


def _real_head(name: str, sharded: bool, classes: int, dim: int, **kw):
    from mhe_scale.heads import create_head
    from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead, ShardedPartialFCHead
    from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead

    if not sharded:
        return create_head(name, in_features=dim, num_classes=classes, **kw)
    cls = {"fc": ShardedFullyConnectedHead, "partial_fc": ShardedPartialFCHead, "mhs": ShardedMultiHeadSamplingHead}
    return cls[name](dim, classes, group=None, **kw)  # group=None: the same math in one process


@pytest.mark.parametrize("name,sharded,kw,spec_kw", [
    ("fc", False, {}, {}),
    ("fc", False, {"cosine": True, "margin": [1.0, 0.5, 0.0]}, {"cosine": True}),
    ("partial_fc", False, {"sample_rate": 1.0}, {"sample_rate": 1.0}),
    ("mhs", False, {"mode": "batch_union", "num_sampled_groups": 1}, {"mode": "batch_union", "num_sampled_groups": 1}),
    ("fc", True, {}, {}),
    ("partial_fc", True, {"sample_rate": 0.5}, {"sample_rate": 0.5}),
    ("mhs", True, {"mode": "batch_union", "num_sampled_groups": 1}, {"mode": "batch_union", "num_sampled_groups": 1}),
])
def test_logit_terms_equal_the_real_heads_step(name, sharded, kw, spec_kw):
    """Peak of the tensors a real head's training forward + backward creates, less the parameters' and
    features' gradients, vs the model's logits + gathered-weights terms (D small: the logits dominate)."""
    rows, classes, dim = 256, 20_000, 4
    head = _real_head(name, sharded, classes, dim, **kw).train()
    sizes = tuple(getattr(head, "sizes", ()) or ()) or None
    spec = HeadSpec(name, classes, dim, sizes=sizes, sharded=sharded, **spec_kw)
    model = sum(t.device for t in head_terms(spec, EngineSpec(), 1, rows)
                if t.name in ("head logits", "head gathered weights"))
    x, y = torch.randn(rows, dim, requires_grad=True), torch.randint(0, classes, (rows,))
    with _LiveBytes() as live:
        head(x, y).loss.backward()
    grads = sum(p.grad.numel() * 4 for p in head.parameters() if p.grad is not None) + x.numel() * 4
    assert live.peak - grads == pytest.approx(model, rel=0.1)


def test_head_momentum_zero_drops_the_sharded_heads_optimizer_term():
    """optim.head_momentum=0 (plain SGD for the head): the class-sharded head's optimizer term is 0 and its
    catch-up holds 2 copies instead of 4, while the encoder keeps its momentum (its optimizer term)."""
    head = HeadSpec("partial_fc", 1_000_000, 128, sharded=True, sample_rate=0.1, row_sparse=True)
    plain = {t.name: t.device for t in head_terms(head, EngineSpec(optimizer="sgd", head_momentum=0.0), 4, 64)}
    default = {t.name: t.device for t in head_terms(head, EngineSpec(optimizer="sgd"), 4, 64)}
    assert plain["head optimizer"] == 0 and default["head optimizer"] == default["head params"] > 0
    assert catch_up_copies("sgd", EngineSpec(optimizer="sgd", head_momentum=0.0).head_sgd_momentum) == 2


def test_the_models_chunk_constants_are_the_codes():
    """plan/memory.py keeps its own copies of the chunk sizes (it does not import the heads); they must be
    the values the optimizer and the MHS head use."""
    import mhe_scale.plan.memory as model
    from mhe_scale.heads.mhs import PREDICT_CHUNK_COLUMNS
    from mhe_scale.optim.row_sparse import REFRESH_CHUNK_ROWS

    assert (model.REFRESH_CHUNK_ROWS, model.PREDICT_CHUNK_COLUMNS) == (REFRESH_CHUNK_ROWS, PREDICT_CHUNK_COLUMNS)
