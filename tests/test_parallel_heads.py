"""Sharded heads in W gloo processes == the single-process heads on the whole batch (float64).

ONE launch of 4 processes runs every check for W=4 (world), W=3 (global ranks 1-3) and W=2
(global ranks 2-3), as test_parallel_collectives.py does; W=1 (group=None) runs in this process.
Every rank builds the single-process head from the same seed and copies its shard of the weights
(`load_single_process_state_`); the parent recomputes the reference on the global batch.
Set-up: C=11 (fc) or 23 (the others: Partial FC; MHS with sizes (7, 4) = a padding code in group
5 and a group made only of padding, which W=4's last rank owns alone; MHC (5, 5) multi- and
single-label, (3, 3, 3) single-label); batch sizes differ per rank (one rank has none), so do the
multi-label widths L_r; most labels live on another rank.
Checks: the loss on every rank; d loss / d features = W x the reference on the rank's rows (the
all-gather convention, see test_parallel_collectives.py); sharded parameter grads concatenated
== the reference's, replicated ones (MHC) == the reference's on every rank; predict == the
reference's predict on the rank's rows; for the sampled heads the same classes/groups are kept
(same generator, or the reference uses the union of what the ranks kept).
Also: the W-independent init, and a head + Adam checkpoint saved by W=3 and loaded by W=2.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.heads import FullyConnectedHead, MultiHeadCascadeHead, MultiHeadSamplingHead, PartialFCHead
from mhe_scale.heads.linear import cosine_similarity
from mhe_scale.labels import multi_hot
from mhe_scale.parallel import ShardPlan, all_reduce_sum, get_rank, get_world_size
from mhe_scale.parallel.checkpoint import load_head_shard, save_head_shard
from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead, ShardedPartialFCHead
from mhe_scale.parallel.sharded_mhc import ShardedMultiHeadCascadeHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead
from mhe_scale.parallel.testing import run_in_processes, subgroup

D = 6
BATCH_SIZES = {1: [7], 2: [3, 5], 3: [4, 1, 3], 4: [2, 0, 3, 4]}
SUBGROUPS = {4: [0, 1, 2, 3], 3: [1, 2, 3], 2: [2, 3]}
TOPK = (1, 4, 30)  # 30 > C: padded tail
MARGIN = dict(cosine=True, margin=(1.0, 0.3, 0.1), scale=16.0)
MHS = dict(sizes=(7, 4), num_sampled_groups=3)
# name -> (single-process class, sharded class, C, constructor kwargs, multilabel targets, train mode)
CASES = {
    "fc_ce": (FullyConnectedHead, ShardedFullyConnectedHead, 11, {}, False, True),
    "fc_bce": (FullyConnectedHead, ShardedFullyConnectedHead, 11, dict(multilabel=True), True, True),
    "fc_margin": (FullyConnectedHead, ShardedFullyConnectedHead, 11, MARGIN, False, True),
    "fc_margin_bce": (FullyConnectedHead, ShardedFullyConnectedHead, 11, dict(multilabel=True, **MARGIN), True, True),
    "pfc": (PartialFCHead, ShardedPartialFCHead, 23, dict(sample_rate=0.25, margin=(1.0, 0.3, 0.1), scale=16.0),
            False, True),
    "pfc_eval": (PartialFCHead, ShardedPartialFCHead, 23, dict(sample_rate=0.25, scale=16.0), False, False),
    "mhs_ps": (MultiHeadSamplingHead, ShardedMultiHeadSamplingHead, 23, dict(mode="per_sample", bias=True, **MHS),
               False, True),
    "mhs_ps_margin": (MultiHeadSamplingHead, ShardedMultiHeadSamplingHead, 23,
                      dict(mode="per_sample", **MHS, **MARGIN), False, True),
    "mhs_bu": (MultiHeadSamplingHead, ShardedMultiHeadSamplingHead, 23, dict(mode="batch_union", **MHS, **MARGIN),
               False, True),
    "mhs_eval": (MultiHeadSamplingHead, ShardedMultiHeadSamplingHead, 23, dict(mode="batch_union", bias=True, **MHS),
                 False, False),
    "mhc_ml": (MultiHeadCascadeHead, ShardedMultiHeadCascadeHead, 23,
               dict(multilabel=True, sizes=(5, 5), top_k_groups=2, hidden=4, level_weights=(0.3, 1.0)), True, True),
    "mhc_sl": (MultiHeadCascadeHead, ShardedMultiHeadCascadeHead, 23, dict(sizes=(5, 5), hidden=4, beam=3),
               False, True),
    "mhc_sl3": (MultiHeadCascadeHead, ShardedMultiHeadCascadeHead, 23, dict(sizes=(3, 3, 3), hidden=4, beam=2),
                False, True),
}
PREDICTS = ("fc_ce", "fc_bce", "fc_margin", "pfc", "mhs_ps", "mhs_eval", "mhc_ml", "mhc_sl", "mhc_sl3")


def make_case(world: int, seed: int, num_classes: int) -> dict:
    """Inputs of one world size, identical in every process: global features, labels, targets
    (rank r's rows use at most 1 + r % 3 label slots, so the per-rank widths L_r differ)."""
    g = torch.Generator().manual_seed(seed * 100 + num_classes)
    sizes = BATCH_SIZES[world]
    total = sum(sizes)
    targets = torch.randint(0, num_classes, (total, 3), generator=g)
    targets[torch.rand(total, 3, generator=g) < 0.3] = -1
    widths = [1 + r % 3 for r in range(world)]
    for r, rows in enumerate(row_slices(sizes)):
        targets[rows, widths[r]:] = -1
    return dict(sizes=sizes, widths=widths, features=torch.randn(total, D, generator=g, dtype=torch.float64),
                labels=torch.randint(0, num_classes, (total,), generator=g), targets=targets)


def row_slices(sizes: list[int]) -> list[slice]:
    bounds = [0]
    for b in sizes:
        bounds.append(bounds[-1] + b)
    return [slice(bounds[r], bounds[r + 1]) for r in range(len(sizes))]


def reference_head(name: str, seed: int):
    single, _, num_classes, kwargs, _, train = CASES[name]
    torch.manual_seed(seed)
    head = single(D, num_classes, **kwargs).double()
    head.train(train)
    return head


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sharded_run(group, seed: int) -> dict:
    """On every rank of `group`: each case's loss, grads, predict; the init; kept sets."""
    rank, world = get_rank(group), get_world_size(group)
    out: dict = {"rank": rank}
    for name, (_, sharded_cls, num_classes, kwargs, multilabel, train) in CASES.items():
        case = make_case(world, seed, num_classes)
        rows = row_slices(case["sizes"])[rank]
        ref = reference_head(name, seed)
        head = sharded_cls(D, num_classes, group=group, **kwargs).double()
        head.load_single_process_state_(ref.state_dict())
        head.train(train)
        targets = case["targets"][rows, :case["widths"][rank]] if multilabel else case["labels"][rows]
        res: dict = {}
        if name in ("pfc", "mhs_bu"):  # what this rank keeps, with the generator forward will use
            head.generator = generator(seed + rank)
            kept = head.kept_classes if name == "pfc" else head.kept_groups
            res["kept"] = kept(case["labels"])
            head.generator = generator(seed + rank)
        elif name == "mhs_ps":
            head.generator = generator(seed)  # the same state on every rank
        # mhs_ps_margin draws from the default generator: seeded with sample_seed=0 on every rank
        features = case["features"][rows].clone().requires_grad_()
        loss = head(features, targets).loss
        loss.backward()
        res.update(loss=loss.detach(), feature_grad=features.grad,
                   grads={n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in head.named_parameters()})
        if name in PREDICTS:
            res["predict"] = {k: head.predict(case["features"][rows], k) for k in TOPK}
        out[name] = res
    # W-independent init: the union of the shards is the group=None head's tensor
    out["init"] = {name: dict(CASES[name][1](D, CASES[name][2], group=group, init_seed=7, **CASES[name][3])
                              .state_dict()) for name in ("fc_ce", "mhs_ps", "mhc_ml")}
    return out


def checkpoint_step(group, directory: str, save: bool) -> dict:
    """W=3 trains one Adam step and saves; W=2 loads what W=3 saved into a fresh head + Adam."""
    head = ShardedFullyConnectedHead(D, 11, group=group, init_seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    if save:
        case = make_case(get_world_size(group), 0, 11)
        rows = row_slices(case["sizes"])[get_rank(group)]
        head(case["features"][rows].float(), case["labels"][rows]).loss.backward()
        opt.step()
        save_head_shard(directory, head, opt)
    else:
        load_head_shard(directory, head, opt)
    return {"weight": head.weight.detach().clone(), "exp_avg": opt.state[head.weight]["exp_avg"].clone(),
            "step": opt.state[head.weight]["step"].clone()}


# ---------------------------------------------------------------- global-norm clipping of a sharded MHC head
MHC_CLIP = dict(multilabel=True, sizes=(5, 5), top_k_groups=2, hidden=4)
CLIP_STEPS, CLIP_NORM, CLIP_LR = 3, 0.05, 0.5


class GroupAccelerator:
    """What ShardedHeadTraining.clip_ uses of an Accelerator, over `group` (None: one process)."""

    device = torch.device("cpu")

    def __init__(self, group) -> None:
        self.group, self.num_processes = group, get_world_size(group)

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return all_reduce_sum(tensor, self.group)


def clip_batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global features [B, D] (float64) and multi-label targets [B, 3] (-1 = padding) of one step."""
    g = torch.Generator().manual_seed(100 + step)
    total = sum(BATCH_SIZES[world])
    targets = torch.randint(0, 23, (total, 3), generator=g)
    targets[torch.rand(total, 3, generator=g) < 0.3] = -1
    return torch.randn(total, D, generator=g, dtype=torch.float64), targets


def mhc_clip_run(group, seed: int) -> dict:
    """CLIP_STEPS SGD steps of a sharded MHC head clipped by ShardedHeadTraining.clip_ (norm small enough to
    bind): this rank's state and the pre-clip norms."""
    from mhe_scale.engine.prepared import ShardedHeadTraining

    torch.manual_seed(seed)
    ref = MultiHeadCascadeHead(D, 23, **MHC_CLIP).double()
    head = ShardedMultiHeadCascadeHead(D, 23, group=group, **MHC_CLIP).double()
    head.load_single_process_state_(ref.state_dict())
    optimizer = torch.optim.SGD(head.parameters(), lr=CLIP_LR)
    training = ShardedHeadTraining(head, optimizer, scheduler=None)
    world, rows = get_world_size(group), row_slices(BATCH_SIZES[get_world_size(group)])[get_rank(group)]
    norms = []
    for step in range(CLIP_STEPS):
        features, targets = clip_batch(world, step)
        head(features[rows], targets[rows]).loss.backward()
        norms.append(training.clip_(GroupAccelerator(group), [], CLIP_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"state": {k: v.clone() for k, v in head.state_dict().items()}, "norms": norms,
            "names": head.single_process_names(), "sharded": head.sharded_parameters}


def sharded_runs(world_group, seed: int, directory: str) -> dict:
    """On each of the 4 ranks: `sharded_run` (+ the checkpoint step) for every world it is in."""
    out = {}
    for world, members in SUBGROUPS.items():
        group = world_group if world == 4 else subgroup(members)  # collective: every rank calls it
        if group is not None:
            out[world] = sharded_run(group, seed)
            if world in (3, 2):
                out[world]["checkpoint"] = checkpoint_step(group, directory, save=world == 3)
            out[world]["clip"] = mhc_clip_run(group, seed)
        all_reduce_sum(torch.zeros(1), world_group)  # W=3 has saved before W=2 loads
    return out


SEED = 5


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """{world size: [result of group rank 0, 1, ...]}: one 4-process launch + W=1 in this process."""
    directory = str(tmp_path_factory.mktemp("head_ckpt"))
    per_rank = run_in_processes(sharded_runs, 4, SEED, directory)
    out = {w: [per_rank[g][w] for g in members] for w, members in SUBGROUPS.items()}
    out[1] = [sharded_run(None, SEED)]
    return out


def reference(name: str, world: int, kept: list[torch.Tensor] | None = None) -> dict:
    """The single-process head on the global batch (for pfc / mhs_bu: on the union of what the
    ranks kept, `kept`)."""
    _, _, num_classes, _, multilabel, _ = CASES[name]
    case = make_case(world, SEED, num_classes)
    head = reference_head(name, SEED)
    features = case["features"].clone().requires_grad_()
    labels = case["labels"]
    if name.startswith("mhs_ps"):
        head.generator = generator(SEED if name == "mhs_ps" else 0)
    if name == "pfc":
        kept = torch.cat(kept).sort().values
        cols = torch.searchsorted(kept, labels)
        loss = F.cross_entropy(head.margin(cosine_similarity(features, head.weight[kept]), cols), cols)
    elif name == "mhs_bu":
        kept = torch.cat(kept).sort().values
        group, member = labels // head.group_size, labels % head.group_size
        cols = torch.searchsorted(kept, group) * head.group_size + member
        codes = (kept.unsqueeze(1) * head.group_size + torch.arange(head.group_size)).flatten()
        logits = head.group_logits(features, kept, cols).masked_fill(codes >= num_classes, float("-inf"))
        loss = F.cross_entropy(logits, cols)
    elif name.startswith("fc") and multilabel:  # FullyConnectedHead's BCE target is fp32 even for fp64 logits
        targets = case["targets"]
        loss = F.binary_cross_entropy_with_logits(head.logits(features, targets),
                                                  multi_hot(targets, num_classes, torch.float64))
    else:
        loss = head(features, case["targets"] if multilabel else labels).loss
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in head.named_parameters()}
    predict = {k: head.predict(case["features"], k) for k in TOPK} if name in PREDICTS else None
    return dict(case=case, loss=loss.detach(), feature_grad=features.grad, grads=grads, predict=predict)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_heads_equal_single_process(world, launched):
    results = launched[world]
    assert [r["rank"] for r in results] == list(range(world))
    for name in CASES:
        want = reference(name, world, [r[name]["kept"] for r in results] if "kept" in results[0][name] else None)
        slices = row_slices(want["case"]["sizes"])
        tol = dict(rtol=1e-9, atol=1e-11)
        sharded_head = CASES[name][1](D, CASES[name][2], **CASES[name][3])  # for the name maps
        names = sharded_head.single_process_names()
        for rank, r in enumerate(results):
            got = r[name]
            torch.testing.assert_close(got["loss"], want["loss"], **tol, msg=lambda m: f"{name} loss: {m}")
            torch.testing.assert_close(got["feature_grad"], world * want["feature_grad"][slices[rank]], **tol,
                                       msg=lambda m: f"{name} feature grad rank {rank}: {m}")
            for n in got["grads"]:
                if n not in sharded_head.sharded_parameters:  # replicated: the full gradient on every rank
                    torch.testing.assert_close(got["grads"][n], want["grads"][names[n]], **tol,
                                               msg=lambda m: f"{name} {n} rank {rank}: {m}")
            if want["predict"] is not None:
                for k in TOPK:
                    top, ids = got["predict"][k]
                    torch.testing.assert_close(top, want["predict"][k][0][slices[rank]], **tol)
                    assert torch.equal(ids, want["predict"][k][1][slices[rank]]), (name, rank, k)
        for n in sharded_head.sharded_parameters:  # sharded: concatenated shards == the full gradient
            torch.testing.assert_close(torch.cat([r[name]["grads"][n] for r in results]), want["grads"][names[n]],
                                       **tol, msg=lambda m: f"{name} {n}: {m}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sampled_heads_keep_positives_and_their_quota(world, launched):
    results = launched[world]
    labels = make_case(world, SEED, 23)["labels"]
    mhs = ShardedMultiHeadSamplingHead(D, 23, mode="batch_union", **MHS)
    for rank, r in enumerate(results):
        start, count = ShardPlan.for_rank(23, rank, world).all_ranges()[rank]
        kept, mine = r["pfc"]["kept"], labels[(labels >= start) & (labels < start + count)].unique()
        assert ((kept >= start) & (kept < start + count)).all() and kept.unique().numel() == kept.numel()
        assert set(mine.tolist()) <= set(kept.tolist())
        assert kept.numel() == max(mine.numel(), math.ceil(0.25 * count))
        g0, g_count = ShardPlan.for_rank(7, rank, world).all_ranges()[rank]
        groups, valid = r["mhs_bu"]["kept"], max(0, min(g_count, mhs.num_valid_groups - g0))
        assert ((groups >= g0) & (groups < g0 + valid)).all()  # never a group made only of padding
        present = (labels // 4)[(labels // 4 >= g0) & (labels // 4 < g0 + g_count)].unique()
        assert set(present.tolist()) <= set(groups.tolist())
        quota = min(valid, math.ceil(3 * valid / mhs.num_valid_groups))
        assert groups.numel() == (0 if valid == 0 else max(present.numel(), quota))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_init_does_not_depend_on_the_world_size(world, launched):
    for name in ("fc_ce", "mhs_ps", "mhc_ml"):
        _, cls, num_classes, kwargs, _, _ = CASES[name]
        single = cls(D, num_classes, init_seed=7, **kwargs).state_dict()
        sharded = cls(D, num_classes, **kwargs).sharded_parameters
        for n, full in single.items():
            parts = [r["init"][name][n] for r in launched[world]]
            if n in sharded:
                assert torch.equal(torch.cat(parts), full), (name, n)
            else:
                assert all(torch.equal(p, full) for p in parts), (name, n)


def test_checkpoint_saved_by_three_ranks_loads_on_two(launched):
    saved = [r["checkpoint"] for r in launched[3]]
    loaded = [r["checkpoint"] for r in launched[2]]
    for key in ("weight", "exp_avg"):
        assert torch.equal(torch.cat([s[key] for s in saved]), torch.cat([s[key] for s in loaded])), key
    assert all(torch.equal(s["step"], torch.tensor(1.0)) for s in saved + loaded)
    assert [s["weight"].shape[0] for s in saved] == [4, 4, 3] and [s["weight"].shape[0] for s in loaded] == [6, 5]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_mhc_clipping_equals_one_process(world, launched):
    """Global-norm clipping counts the replicated group layer and projections once, not once per rank:
    the same pre-clip norms and weights as the single-process head clipped by torch on the whole batch."""
    torch.manual_seed(SEED)
    head = MultiHeadCascadeHead(D, 23, **MHC_CLIP).double()
    optimizer = torch.optim.SGD(head.parameters(), lr=CLIP_LR)
    norms = []
    for step in range(CLIP_STEPS):
        features, targets = clip_batch(world, step)
        head(features, targets).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(head.parameters(), CLIP_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert min(norms) > 2 * CLIP_NORM  # clipping binds at every step
    full = head.state_dict()
    runs = [r["clip"] for r in launched[world]]
    for run in runs:
        assert run["norms"] == pytest.approx(norms, rel=1e-6)  # clip_ sums squares in fp32
    for name, single in runs[0]["names"].items():
        parts = [run["state"][name] for run in runs]
        got = torch.cat(parts) if name in runs[0]["sharded"] else parts[0]
        torch.testing.assert_close(got, full[single], rtol=1e-6, atol=1e-9, msg=name)
        if name not in runs[0]["sharded"]:
            assert all(torch.equal(p, parts[0]) for p in parts), name  # replicated: equal on every rank
