"""Class-sharded head math in W gloo processes == one process on the full batch and all classes.

Spawning costs seconds per process, the math milliseconds: ONE launch of 4 processes does every
check for W=4 (the world group), W=3 (global ranks 1-3) and W=2 (global ranks 2-3; so group ranks
differ from global ranks); the parent compares with a single-process reference from the same seed.

Set-up mirrors training: a tiny shared "backbone" (a Linear, same weights on every rank) maps
each rank's own inputs (batch sizes differ per rank, one rank may have none) to features; the
features are all-gathered with `all_gather_with_grad`; each rank scores the global batch against
its own shard of the head weight (C=11 classes, uneven split); the loss is a sharded loss.

Gradient checks (what must hold, and why):
  * head weight: the shards' gradients, concatenated, equal the reference gradient (a sharded
    head is never averaged across ranks, so this is the exact gradient);
  * features, default grad_scale (= W): rank r's feature gradient equals W x the reference's
    gradient on rank r's rows, so the backbone gradient AVERAGED over ranks (what DDP / ZeRO do)
    equals the reference backbone gradient; we simulate DDP by averaging in the parent;
  * features, grad_scale=1: the feature gradient equals the reference exactly, so the backbone
    gradients SUMMED over ranks equal the reference.
"""

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.heads.linear import FullyConnectedHead, cosine_similarity
from mhe_scale.labels import multi_hot
from mhe_scale.parallel import (ShardPlan, all_gather_no_grad, all_gather_with_grad, all_reduce_max, all_reduce_sum,
                                gather_sizes, get_rank, get_world_size, local_multi_hot, sharded_bce_with_logits,
                                sharded_cross_entropy, sharded_topk)
from mhe_scale.parallel.testing import run_in_processes, subgroup

NUM_CLASSES, IN_DIM, FEAT_DIM = 11, 5, 6
BATCH_SIZES = {2: [3, 5], 3: [4, 1, 3], 4: [2, 0, 3, 4]}
TOPK = (1, 3, 5, 13)                    # k > some shards' count, and k > C (padded tail)
MARGIN = dict(cosine=True, margin=(1.0, 0.3, 0.1), scale=16.0)  # ArcFace + CosFace terms
MODES = ("ce", "ce_unscaled", "bce", "margin")
SUBGROUPS = {4: [0, 1, 2, 3], 3: [1, 2, 3], 2: [2, 3]}  # world size -> global ranks of one launch


def make_case(world: int, seed: int) -> dict:
    """Everything both sides need, from one seed (identical in every process)."""
    g = torch.Generator().manual_seed(seed)
    sizes = BATCH_SIZES[world]
    total = sum(sizes)
    labels = torch.randint(0, NUM_CLASSES, (total,), generator=g)
    labels[torch.randperm(total, generator=g)[:2]] = -1  # ignored rows (e.g. sampled heads)
    targets = torch.randint(0, NUM_CLASSES, (total, 3), generator=g)
    targets[torch.rand(total, 3, generator=g) < 0.3] = -1
    return dict(
        sizes=sizes,
        inputs=torch.randn(total, IN_DIM, generator=g, dtype=torch.float64),
        backbone=torch.randn(FEAT_DIM, IN_DIM, generator=g, dtype=torch.float64),
        weight=torch.randn(NUM_CLASSES, FEAT_DIM, generator=g, dtype=torch.float64) / 2,
        labels=labels,
        margin_labels=torch.randint(0, NUM_CLASSES, (total,), generator=g),  # the fc head takes no -1
        targets=targets,
        scores=torch.randn(total, NUM_CLASSES, generator=g),
    )


def forward_loss(mode: str, features: torch.Tensor, weight: torch.Tensor, case: dict, plan: ShardPlan,
                 group) -> torch.Tensor:
    """The sharded loss of one mode on this rank's class columns (group=None: unused)."""
    if mode == "margin":
        margin = FullyConnectedHead(FEAT_DIM, NUM_CLASSES, **MARGIN).margin
        logits = margin(cosine_similarity(features, weight), plan.to_local(case["margin_labels"]))
        return sharded_cross_entropy(logits, case["margin_labels"], plan, group)
    logits = features @ weight.T
    if mode == "bce":
        return sharded_bce_with_logits(logits, local_multi_hot(case["targets"], plan, logits.dtype), NUM_CLASSES, group)
    return sharded_cross_entropy(logits, case["labels"], plan, group)


def sharded_run(group, seed: int) -> dict:
    """Runs on every rank: collectives, every loss mode with gradients, top-k."""
    rank, world = get_rank(group), get_world_size(group)
    case = make_case(world, seed)
    plan = ShardPlan.from_group(NUM_CLASSES, group)
    sizes = gather_sizes(case["sizes"][rank], group)
    assert sizes == case["sizes"], (sizes, case["sizes"])
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    out: dict = {"rank": rank, "plan": (plan.start, plan.count)}

    # plain collectives: unequal int gathers, reductions
    out["labels"] = all_gather_no_grad(case["labels"][rows], group)
    out["max"] = all_reduce_max(torch.tensor([float(rank), -float(rank)]), group)
    out["sum"] = all_reduce_sum(torch.tensor([float(rank + 1)]), group)

    for mode in MODES:
        backbone = case["backbone"].clone().requires_grad_()
        weight = case["weight"][plan.local_slice()].clone().requires_grad_()
        if mode == "margin":
            backbone, weight = backbone.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        features = case["inputs"][rows].to(backbone.dtype) @ backbone.T
        features.retain_grad()
        gathered = all_gather_with_grad(features, group, grad_scale=1.0 if mode == "ce_unscaled" else None,
                                        sizes=sizes if mode == "bce" else None)
        loss = forward_loss(mode, gathered, weight, case, plan, group)
        loss.backward()
        out[mode] = dict(loss=loss.detach(), feature_grad=features.grad, backbone_grad=backbone.grad,
                         weight_grad=weight.grad)

    local_scores = case["scores"][:, plan.local_slice()]
    out["topk"] = {k: sharded_topk(local_scores, k, plan, group) for k in TOPK}
    return out


def sharded_runs(world_group, seed: int) -> dict:
    """Runs on each of the 4 ranks: `sharded_run` for every world size this rank takes part in."""
    out = {}
    for world, members in SUBGROUPS.items():
        group = world_group if world == 4 else subgroup(members)  # collective: every rank calls it
        if group is not None:
            out[world] = sharded_run(group, seed + world)
    return out


@pytest.fixture(scope="module")
def launched() -> dict:
    """{world size: [result of group rank 0, 1, ...]} from one 4-process launch."""
    seed = 100
    per_rank = run_in_processes(sharded_runs, 4, seed)
    return {w: [per_rank[g][w] for g in members] for w, members in SUBGROUPS.items()} | {"seed": seed}


def reference(case: dict) -> dict:
    """One process, full batch, all classes: plain torch losses (and the fc head for margins)."""
    ref = {}
    for mode in MODES:
        backbone = case["backbone"].clone().requires_grad_()
        if mode == "margin":
            backbone = backbone.detach().float().requires_grad_()
            head = FullyConnectedHead(FEAT_DIM, NUM_CLASSES, **MARGIN)
            with torch.no_grad():
                head.weight.copy_(case["weight"].float())
            features = case["inputs"].float() @ backbone.T
            features.retain_grad()
            loss = head(features, case["margin_labels"]).loss
            weight = head.weight
        else:
            weight = case["weight"].clone().requires_grad_()
            features = case["inputs"] @ backbone.T
            features.retain_grad()
            logits = features @ weight.T
            if mode == "bce":
                loss = F.binary_cross_entropy_with_logits(logits, multi_hot(case["targets"], NUM_CLASSES).double())
            else:
                loss = F.cross_entropy(logits, case["labels"], ignore_index=-1)
        loss.backward()
        ref[mode] = dict(loss=loss.detach(), feature_grad=features.grad, backbone_grad=backbone.grad,
                         weight_grad=weight.grad)
    return ref


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_equals_single_process(world, launched):
    results = launched[world]
    case = make_case(world, launched["seed"] + world)
    ref = reference(case)
    assert [r["rank"] for r in results] == list(range(world))
    assert [r["plan"] for r in results] == ShardPlan.for_rank(NUM_CLASSES, 0, world).all_ranges()
    bounds = [0]
    for b in case["sizes"]:
        bounds.append(bounds[-1] + b)

    for r in results:
        assert torch.equal(r["labels"], case["labels"])
        assert r["max"].tolist() == [world - 1.0, 0.0]
        assert r["sum"].tolist() == [world * (world + 1) / 2]

    for mode in MODES:
        tol = dict(rtol=2e-5, atol=2e-6) if mode == "margin" else dict(rtol=1e-10, atol=1e-12)
        want = ref[mode]
        for r in results:  # the same global loss on every rank
            torch.testing.assert_close(r[mode]["loss"], want["loss"], **tol)
        # head: concatenated shard gradients == full-weight gradient (no averaging, no factor)
        torch.testing.assert_close(torch.cat([r[mode]["weight_grad"] for r in results]), want["weight_grad"], **tol)
        # features: x W by default (see module docstring), exact with grad_scale=1
        factor = 1.0 if mode == "ce_unscaled" else float(world)
        for rank, r in enumerate(results):
            expected = factor * want["feature_grad"][bounds[rank]:bounds[rank + 1]]
            torch.testing.assert_close(r[mode]["feature_grad"], expected, **tol)
        # backbone: simulate DDP (average over ranks) for the default, a plain sum for grad_scale=1
        backbone = torch.stack([r[mode]["backbone_grad"] for r in results])
        combined = backbone.sum(0) if mode == "ce_unscaled" else backbone.mean(0)
        torch.testing.assert_close(combined, want["backbone_grad"], **tol)

    for k in TOPK:
        ref_top, ref_ids = case["scores"].topk(min(k, NUM_CLASSES), dim=1)
        for r in results:  # every rank the same answer, global ids
            top, ids = r["topk"][k]
            assert top.shape == ids.shape == (sum(case["sizes"]), k)
            assert torch.equal(top[:, :NUM_CLASSES], ref_top) and torch.equal(ids[:, :NUM_CLASSES], ref_ids)
            assert (ids[:, NUM_CLASSES:] == -1).all()


def fail_on_rank_one(group) -> None:
    if get_rank(group) == 1:
        assert 1 + 1 == 3, "rank one is unhappy"
    all_reduce_sum(torch.ones(1), group)  # rank 0 blocks here until it is stopped


def test_run_in_processes_reports_the_failing_rank():
    with pytest.raises(AssertionError) as info:
        run_in_processes(fail_on_rank_one, 2, timeout_s=60.0, grace_s=1.0)
    text = str(info.value)
    assert "rank 1 of 2 raised" in text and "rank one is unhappy" in text
    # rank 0 (stuck in a collective) was stopped or failed after rank 1: reported second
    assert text.index("rank 1 of 2") < text.index("rank 0 of 2")
