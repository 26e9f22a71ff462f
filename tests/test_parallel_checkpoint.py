"""Head-shard checkpoints: save on W ranks, load on any W', export one file; no processes needed
(the functions take a plan, so ranks are simulated in one process). The multi-process round trip
of a real head + Adam (W=3 -> W=2) is in test_parallel_heads.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mhe_scale.heads import MultiHeadCascadeHead
from mhe_scale.parallel import checkpoint as ckpt
from mhe_scale.parallel import ShardPlan
from mhe_scale.parallel.checkpoint import (export_merged, load_head_shard, load_resharded, read_index,
                                           save_head_shard, save_shard)
from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead
from mhe_scale.parallel.sharded_mhc import ShardedMultiHeadCascadeHead

C = 23


def full_state(dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(C, 4, generator=g).to(dtype), "bias": torch.randn(C, generator=g).to(dtype),
            "optim.weight.exp_avg": torch.randn(C, 4, generator=g), "optim.weight.step": torch.tensor(7.0),
            "proj": torch.randn(3, 2, generator=g)}


SHARDED = ("weight", "bias", "optim.weight.exp_avg")


def save_world(directory, world: int, state: dict, names=None) -> None:
    for rank in range(world):
        plan = ShardPlan.for_rank(C, rank, world)
        part = {k: (v[plan.local_slice()] if k in SHARDED else v) for k, v in state.items()}
        save_shard(directory, plan, part, SHARDED, names=names)


@pytest.mark.parametrize("saved_world", [1, 3])
def test_load_on_any_world_size_gives_the_slices(tmp_path, saved_world):
    state = full_state()
    save_world(tmp_path, saved_world, state)
    assert len(read_index(tmp_path)) == saved_world
    for world in (1, 2, 3, 4, 5):
        for rank in range(world):
            plan = ShardPlan.for_rank(C, rank, world)
            got = load_resharded(tmp_path, plan)
            assert set(got.tensors) == set(state) and set(got.sharded) == set(SHARDED)
            for name, full in state.items():
                want = full[plan.local_slice()] if name in SHARDED else full
                assert torch.equal(got.tensors[name], want), (world, rank, name)
    only = load_resharded(tmp_path, ShardPlan.for_rank(C, 1, 2), names=["bias"]).tensors
    assert list(only) == ["bias"] and torch.equal(only["bias"], state["bias"][12:])


def test_load_reads_only_overlapping_slices(tmp_path, monkeypatch):
    save_world(tmp_path, 4, full_state())
    index = read_index(tmp_path)  # reads every header; the data reads come after
    monkeypatch.setattr(ckpt, "read_index", lambda directory: index)
    opened = []
    real = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open",
                        lambda path, **kw: opened.append(path.rsplit("/", 1)[-1]) or real(path, **kw))
    load_resharded(tmp_path, ShardPlan.for_rank(C, 0, 3))   # rows [0, 8): shards 0 (0-6) and 1 (6-12)
    assert sorted(set(opened)) == ["head-shard-0-of-4.safetensors", "head-shard-1-of-4.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_merged_equals_the_full_tensors(tmp_path, monkeypatch, dtype):
    state = full_state(dtype)
    save_world(tmp_path / "ck", 3, state, names={"weight": "fc.weight"})
    monkeypatch.setattr(ckpt, "EXPORT_BLOCK_BYTES", 20)  # several blocks per shard
    out = export_merged(tmp_path / "ck", tmp_path / "head.safetensors")
    merged = load_file(str(out))
    assert set(merged) == {"fc.weight", "bias", "proj"}  # renamed; no optimizer state
    assert torch.equal(merged["fc.weight"], state["weight"]) and merged["fc.weight"].dtype == dtype
    assert torch.equal(merged["bias"], state["bias"]) and torch.equal(merged["proj"], state["proj"])
    both = load_file(str(export_merged(tmp_path / "ck", tmp_path / "all.safetensors", single_process_names=False,
                                       include_optimizer=True)))
    assert set(both) == set(state)
    for name, value in state.items():
        assert torch.equal(both[name], value), name


def test_sharded_head_and_adam_round_trip(tmp_path):
    """Save a head + Adam after two steps, reload into fresh ones: the next step is identical."""
    x, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 22, 7, 7, 11])

    def step(head, opt):
        head(x, y).loss.backward()
        opt.step()
        opt.zero_grad()

    head = ShardedFullyConnectedHead(5, C, init_seed=3)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, betas=(0.8, 0.9))
    step(head, opt)
    step(head, opt)
    save_head_shard(tmp_path, head, opt)
    for world in (2, 3):  # the saved Adam moments, resharded like the weight
        plan = ShardPlan.for_rank(C, 1, world)
        got = load_resharded(tmp_path, plan).tensors
        assert torch.equal(got["optim.weight.exp_avg_sq"], opt.state[head.weight]["exp_avg_sq"][plan.local_slice()])
        assert torch.equal(got["optim.bias.exp_avg"], opt.state[head.bias]["exp_avg"][plan.local_slice()])
        assert torch.equal(got["optim.weight.step"], opt.state[head.weight]["step"])
    fresh = ShardedFullyConnectedHead(5, C, init_seed=99)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    load_head_shard(tmp_path, fresh, fresh_opt)
    assert fresh_opt.param_groups[0]["lr"] == 0.01 and fresh_opt.param_groups[0]["betas"] == (0.8, 0.9)
    step(head, opt)
    step(fresh, fresh_opt)
    assert torch.equal(head.weight, fresh.weight) and torch.equal(head.bias, fresh.bias)
    with pytest.raises(ValueError, match="no optimizer state"):
        save_head_shard(tmp_path / "bare", head)
        load_head_shard(tmp_path / "bare", fresh, fresh_opt)


def test_cascade_export_loads_into_the_single_process_head(tmp_path):
    sharded = ShardedMultiHeadCascadeHead(6, C, multilabel=True, sizes=(5, 5), hidden=4, top_k_groups=2, init_seed=5)
    save_head_shard(tmp_path / "ck", sharded)
    single = MultiHeadCascadeHead(6, C, multilabel=True, sizes=(5, 5), hidden=4, top_k_groups=2)
    single.load_state_dict(load_file(str(export_merged(tmp_path / "ck", tmp_path / "mhc.safetensors"))))
    x = torch.randn(4, 6)
    for a, b in zip(single.predict(x, 5), sharded.predict(x, 5)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- errors
def write_fake(directory, rank, world, start, count, num_items=C, fmt=ckpt.FORMAT):
    meta = {"format": fmt, "num_items": str(num_items), "world": str(world), "rank": str(rank), "start": str(start),
            "count": str(count), "sharded": json.dumps(["weight"]), "names": "{}", "optimizer": "null"}
    directory.mkdir(exist_ok=True)
    save_file({"weight": torch.zeros(count, 2)}, str(ckpt.shard_path(directory, rank, world)), metadata=meta)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no head-shard"):
        read_index(tmp_path / "nowhere")
    save_world(tmp_path / "a", 3, full_state())
    with pytest.raises(ValueError, match="num_items=23 but the plan has num_items=24"):
        load_resharded(tmp_path / "a", ShardPlan.for_rank(24, 0, 2))
    with pytest.raises(KeyError, match="no tensors"):
        load_resharded(tmp_path / "a", ShardPlan.for_rank(C, 0, 2), names=["nope"])
    ckpt.shard_path(tmp_path / "a", 1, 3).unlink()
    with pytest.raises(FileNotFoundError, match=r"ranks \[1\] of 3.*head-shard-1-of-3"):
        load_resharded(tmp_path / "a", ShardPlan.for_rank(C, 0, 2))
    save_world(tmp_path / "a", 2, full_state())
    with pytest.raises(ValueError, match=r"mixes shards of world sizes \[2, 3\]"):
        read_index(tmp_path / "a")
    write_fake(tmp_path / "overlap", 0, 2, 0, 12)
    write_fake(tmp_path / "overlap", 1, 2, 10, 13)
    with pytest.raises(ValueError, match="overlaps"):
        read_index(tmp_path / "overlap")
    write_fake(tmp_path / "gap", 0, 2, 0, 10)
    write_fake(tmp_path / "gap", 1, 2, 12, 11)
    with pytest.raises(ValueError, match=r"leaves rows \[10, 12\) uncovered"):
        read_index(tmp_path / "gap")
    write_fake(tmp_path / "short", 0, 2, 0, 10)
    write_fake(tmp_path / "short", 1, 2, 10, 10)
    with pytest.raises(ValueError, match="incomplete"):
        read_index(tmp_path / "short")
    write_fake(tmp_path / "sizes", 0, 2, 0, 12)
    write_fake(tmp_path / "sizes", 1, 2, 12, 11, num_items=30)
    with pytest.raises(ValueError, match="num_items=30"):
        read_index(tmp_path / "sizes")
    write_fake(tmp_path / "alien", 0, 1, 0, C, fmt="something else")
    with pytest.raises(ValueError, match="not a head shard"):
        read_index(tmp_path / "alien")
    with pytest.raises(ValueError, match="owns 12 rows"):
        save_shard(tmp_path / "b", ShardPlan.for_rank(C, 0, 2), {"weight": torch.zeros(11, 2)}, ["weight"])
