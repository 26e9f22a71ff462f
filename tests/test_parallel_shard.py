"""Shard arithmetic and the single-process (group=None) path of mhe_scale.parallel.

The multi-process (gloo) checks live in test_parallel_collectives.py.
"""

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.labels import multi_hot
from mhe_scale.parallel import (ShardPlan, all_gather_no_grad, all_gather_with_grad, all_reduce_max, all_reduce_sum,
                                gather_sizes, get_rank, get_world_size, local_multi_hot, shard_range,
                                sharded_bce_with_logits, sharded_cross_entropy, sharded_topk)


# ---------------------------------------------------------------- shard_range / ShardPlan
def test_shard_range_known_answers():
    assert [shard_range(11, r, 3) for r in range(3)] == [(0, 4), (4, 4), (8, 3)]
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert shard_range(5, 0, 1) == (0, 5)
    assert [shard_range(3, r, 3) for r in range(3)] == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("num_items", [1, 2, 7, 11, 12, 31])
def test_shard_range_contiguous_balanced_and_covering(num_items):
    for world in range(1, num_items + 1):
        ranges = [shard_range(num_items, r, world) for r in range(world)]
        owner = [[] for _ in range(num_items)]
        for r, (start, count) in enumerate(ranges):
            for i in range(start, start + count):
                owner[i].append(r)
        assert all(len(o) == 1 for o in owner), (num_items, world, ranges)  # each item exactly once
        assert [o[0] for o in owner] == sorted(o[0] for o in owner)           # in rank order
        counts = [c for _, c in ranges]
        extra = num_items % world
        assert counts == [num_items // world + (r < extra) for r in range(world)]


@pytest.mark.parametrize("args, words", [
    ((3, 0, 4), ["num_items=3", "world=4"]),
    ((10, 4, 4), ["rank=4", "[0, 4)"]),
    ((10, -1, 2), ["rank=-1"]),
    ((10, 0, 0), ["world=0"]),
])
def test_shard_range_errors_name_the_values(args, words):
    with pytest.raises(ValueError) as info:
        shard_range(*args)
    for w in words:
        assert w in str(info.value)


def test_shard_plan_conversions_and_every_id_owned_once():
    num_items, world = 11, 4
    plans = [ShardPlan.for_rank(num_items, r, world) for r in range(world)]
    ids = torch.tensor([-1, 0, 2, 3, 5, 8, 10, 11, 40])
    owned = torch.stack([p.owns(ids) for p in plans])
    real = (ids >= 0) & (ids < num_items)
    assert torch.equal(owned.sum(0), real.long())
    for p in plans:
        local = p.to_local(ids)
        for i, l in zip(ids.tolist(), local.tolist()):
            assert l == (i - p.start if p.start <= i < p.start + p.count else -1)
        assert torch.equal(p.to_global(local[local >= 0]), ids[local >= 0])
        assert p.all_ranges() == [(q.start, q.count) for q in plans]
        assert torch.arange(num_items)[p.local_slice()].tolist() == list(range(p.start, p.end))


def test_shard_plan_rejects_inconsistent_ranges_and_group_none():
    with pytest.raises(ValueError, match="for_rank"):
        ShardPlan(num_items=11, world=3, rank=1, start=3, count=4)
    assert ShardPlan.from_group(7, None) == ShardPlan(7, 1, 0, 0, 7)
    assert get_rank(None) == 0 and get_world_size(None) == 1 and gather_sizes(5, None) == [5]


# ---------------------------------------------------------------- group=None: same math, no collectives
def _case(b=7, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, c, (b,), generator=g)
    labels[[1, 4]] = -1
    return logits, labels


def test_cross_entropy_single_process_matches_torch_and_gradcheck():
    logits, labels = _case()
    plan = ShardPlan.from_group(logits.shape[1], None)
    x = logits.clone().requires_grad_()
    loss = sharded_cross_entropy(x, labels, plan, None)
    ref_x = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_x, labels, ignore_index=-1)
    (loss * 1.7).backward()
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: sharded_cross_entropy(t, labels[:4], plan, None),
                                    (logits[:4].clone().requires_grad_(),))
    # every row ignored: nan, as F.cross_entropy
    none = torch.full_like(labels, -1)
    assert torch.isnan(sharded_cross_entropy(logits, none, plan, None))
    assert torch.isnan(F.cross_entropy(logits, none, ignore_index=-1))


def test_cross_entropy_bf16_reduces_in_fp32():
    logits, labels = _case(b=16, c=33, seed=1)
    plan = ShardPlan.from_group(33, None)
    x = logits.to(torch.bfloat16).requires_grad_()
    loss = sharded_cross_entropy(x, labels, plan, None)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref_x = x.detach().double().requires_grad_()
    F.cross_entropy(ref_x, labels, ignore_index=-1).backward()
    torch.testing.assert_close(loss.double(), F.cross_entropy(ref_x.detach(), labels, ignore_index=-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=2e-2, atol=1e-3)


def test_cross_entropy_rejects_bad_shapes():
    logits, labels = _case()
    with pytest.raises(ValueError, match="rank 0 of 2 .* rank 0 of 1"):
        sharded_cross_entropy(logits, labels, ShardPlan.for_rank(logits.shape[1], 0, 2), None)
    with pytest.raises(ValueError, match=r"\[7, 9\]"):
        sharded_cross_entropy(logits[:, :5], labels, ShardPlan.from_group(9, None), None)
    with pytest.raises(ValueError, match="integer tensor"):
        sharded_cross_entropy(logits, labels.double(), ShardPlan.from_group(9, None), None)


def test_bce_single_process_matches_torch_and_local_multi_hot():
    logits, _ = _case(b=5, c=8)
    targets = torch.tensor([[0, 3, -1], [7, -1, -1], [-1, -1, -1], [1, 2, 5], [4, 4, 6]])
    full = multi_hot(targets, 8).double()
    for world in (1, 3):
        parts = [local_multi_hot(targets, ShardPlan.for_rank(8, r, world), torch.float64) for r in range(world)]
        assert torch.equal(torch.cat(parts, dim=1), full)
    x = logits.clone().requires_grad_()
    loss = sharded_bce_with_logits(x, full, 8, None)
    ref = F.binary_cross_entropy_with_logits(logits, full)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: sharded_bce_with_logits(t, full, 8, None), (x,))


def test_all_gather_and_reduce_are_identities_without_group():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for scale, factor in ((None, 1.0), (1.0, 1.0), (3.0, 3.0)):
        x.grad = None
        y = all_gather_with_grad(x, None, grad_scale=scale)
        assert torch.equal(y, x)
        (y * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(x.grad, factor * torch.arange(3.0, dtype=torch.float64).expand(4, 3))
    labels = torch.tensor([3, -1, 2])
    assert torch.equal(all_gather_no_grad(labels, None), labels)
    assert torch.equal(all_reduce_sum(x, None), x) and torch.equal(all_reduce_max(x, None), x)
    with pytest.raises(ValueError, match="sizes"):
        all_gather_with_grad(x, None, sizes=[3])


@pytest.mark.parametrize("k", [1, 4, 9, 12])
def test_topk_single_process_matches_torch_and_pads(k):
    scores = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    top, ids = sharded_topk(scores, k, ShardPlan.from_group(9, None), None)
    ref, ref_ids = scores.topk(min(k, 9), dim=1)
    assert top.shape == ids.shape == (6, k)
    assert torch.equal(top[:, :min(k, 9)], ref) and torch.equal(ids[:, :min(k, 9)], ref_ids)
    assert (ids[:, 9:] == -1).all() and torch.isinf(top[:, 9:]).all()
