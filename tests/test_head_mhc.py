import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.heads import create_head
from mhe_scale.heads.mhc import MultiHeadCascadeHead, select_candidates
from mhe_scale.labels import pad_label_lists

# (sizes, C): every case has padding codes; [4, 3, 3] / [5, 3] also have a level-0 group of padding only
CASES = [([4, 3], 10), ([5, 3], 11), ([3, 3, 3], 23), ([4, 3, 3], 23)]


def make_head(sizes, c, multilabel, **kwargs):
    torch.manual_seed(0)
    head = MultiHeadCascadeHead(5, c, multilabel=multilabel, sizes=sizes, hidden=4, **kwargs).double()
    with torch.no_grad():  # non-zero biases so they are tested too
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


def make_batch(seed, b, c, multilabel, d=5):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, d, generator=gen, dtype=torch.float64)
    if multilabel:  # 0..5 labels per row, so some rows have more true groups than K
        rows = [torch.randperm(c, generator=gen)[: int(torch.randint(0, 6, (1,), generator=gen))].tolist()
                for _ in range(b)]
        return features, pad_label_lists(rows)
    return features, torch.randint(0, c, (b,), generator=gen)


def layout(sizes, c):
    strides = [math.prod(sizes[h + 1:]) for h in range(len(sizes))]
    return strides, [math.ceil(c / s) for s in strides]


def ref_logit(head, f, h, code):
    """Level-h logit of one prefix code for one feature row f [D], written out by hand."""
    if h == 0:
        return head.group_layer.weight[code] @ f + head.group_layer.bias[code]
    q = head.proj[h - 1].weight @ f + head.proj[h - 1].bias
    z = head.embed[h - 1].weight[code] @ q
    return z + head.prefix_bias[h - 1][code] if head.prefix_bias is not None else z


def naive_multilabel(head, features, targets, k, weights=None):
    """Loss and, per row and level < H-1, the kept prefix codes (one row at a time)."""
    weights = weights or [1.0] * len(head.sizes)
    sizes, c, depth = head.sizes, head.num_classes, len(head.sizes)
    strides, n = layout(sizes, c)
    sums, counts, kept_all = [0.0] * depth, [0] * depth, []
    for i in range(features.shape[0]):
        labels = {int(t) for t in targets[i] if t >= 0}
        cands, row_kept = [(g, 0.0) for g in range(n[0])], []
        for h in range(depth):
            true_h = {y // strides[h] for y in labels}
            scored = []
            for code, parent_path in cands:
                if code >= n[h]:
                    continue
                z = ref_logit(head, features[i], h, code)
                t = 1.0 if code in true_h else 0.0
                sums[h] = sums[h] - (t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z))
                counts[h] += 1
                scored.append((code, parent_path + F.logsigmoid(z).item(), code in true_h))
            if h == depth - 1:
                break
            trues = sorted([s for s in scored if s[2]], key=lambda s: -s[1])
            falses = sorted([s for s in scored if not s[2]], key=lambda s: -s[1])
            kept = (trues + falses)[:k]
            row_kept.append(sorted(s[0] for s in kept))
            cands = [(p * sizes[h + 1] + j, path) for p, path, _ in kept for j in range(sizes[h + 1])]
        kept_all.append(row_kept)
    return sum(w * s / n_ for w, s, n_ in zip(weights, sums, counts)), kept_all


def naive_single(head, features, targets, weights=None):
    sizes, c, depth = head.sizes, head.num_classes, len(head.sizes)
    weights = weights or [1.0] * depth
    strides, n = layout(sizes, c)
    total = 0.0
    for i in range(features.shape[0]):
        y = int(targets[i])
        for h in range(depth):
            if h == 0:
                codes = list(range(n[0]))
            else:
                parent = y // strides[h - 1]
                codes = [parent * sizes[h] + j for j in range(sizes[h]) if parent * sizes[h] + j < n[h]]
            z = torch.stack([ref_logit(head, features[i], h, code) for code in codes])
            total = total - weights[h] * F.log_softmax(z, 0)[codes.index(y // strides[h])]
    return total / features.shape[0]


def brute_scores(head, features):
    """Path score of every real label [B, C]: log_softmax over valid siblings, or logsigmoid."""
    sizes, c, depth = head.sizes, head.num_classes, len(head.sizes)
    strides, n = layout(sizes, c)
    out = torch.zeros(features.shape[0], c, dtype=torch.float64)
    for i in range(features.shape[0]):
        for y in range(c):
            for h in range(depth):
                code = y // strides[h]
                if head.multilabel:
                    out[i, y] += F.logsigmoid(ref_logit(head, features[i], h, code)).item()
                    continue
                first = (code // sizes[h]) * sizes[h] if h > 0 else 0
                siblings = [s for s in range(first, first + (sizes[h] if h > 0 else n[0])) if s < n[h]]
                z = torch.stack([ref_logit(head, features[i], h, s) for s in siblings])
                out[i, y] += F.log_softmax(z, 0)[siblings.index(code)].item()
    return out


def grads(loss, head, features):
    params = [features] + list(head.parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


# ------------------------------------------------------------------ candidate selection
@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_select_candidates_true_first_then_best_false(k):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(20, 12, generator=gen)
    is_true = torch.rand(20, 12, generator=gen) < 0.3
    is_true[0] = True  # more truths than k
    is_true[1] = False  # no truth at all
    got = select_candidates(scores, is_true, k)
    for i in range(20):
        order = sorted(range(12), key=lambda j: (not bool(is_true[i, j]), -float(scores[i, j])))
        assert got[i].tolist() == order[:k]


@pytest.mark.parametrize("sizes,c", CASES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cascade_keeps_true_prefixes_and_hard_negatives(sizes, c, k):
    head = make_head(sizes, c, True, top_k_groups=k)
    features, targets = make_batch(1, 7, c, True)
    levels = head.cascade(features, targets)
    _, ref_kept = naive_multilabel(head, features, targets, k)
    _, n = layout(sizes, c)
    for h in range(len(sizes) - 1):
        child = levels[h + 1]
        assert child.codes.shape == (7, min(k, levels[h].codes.shape[1]) * sizes[h + 1])  # K*s, never C
        parents = child.codes[:, :: sizes[h + 1]] // sizes[h + 1]
        for i in range(7):
            got = sorted(p for p in parents[i].tolist() if p < n[h])
            assert got == ref_kept[i][h]
    # every true label whose ancestors were all kept is among the last level's candidates
    labels = [{int(t) for t in row if t >= 0} for row in targets]
    for i in range(7):
        marked = set(levels[-1].codes[i][levels[-1].is_true[i]].tolist())
        assert marked <= labels[i] and (len(labels[i]) == 0 or marked)


# ------------------------------------------------------------------ loss and gradients
@pytest.mark.parametrize("sizes,c", CASES)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("label_bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_multilabel_loss_and_grads_match_naive(sizes, c, k, label_bias, weighted):
    weights = [0.25 + 0.5 * h for h in range(len(sizes))] if weighted else None
    head = make_head(sizes, c, True, top_k_groups=k, label_bias=label_bias, level_weights=weights)
    features, targets = make_batch(2, 6, c, True)
    features.requires_grad_(True)
    out = head(features, targets)
    ref, _ = naive_multilabel(head, features, targets, k, weights)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    level_sum = sum(w * x for w, x in zip(head.level_weights, out.metrics.values()))  # metrics: unweighted terms
    assert level_sum.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, r in zip(grads(out.loss, head, features), grads(ref, head, features)):
        assert torch.allclose(g, r, atol=1e-10)


@pytest.mark.parametrize("sizes,c", CASES)
@pytest.mark.parametrize("weights", [None, "zero_first"])
def test_single_label_loss_and_grads_match_naive(sizes, c, weights):
    weights = [0.0] + [1.5] * (len(sizes) - 1) if weights else None
    head = make_head(sizes, c, False, level_weights=weights)
    features, targets = make_batch(3, 8, c, False)
    targets[0] = c - 1  # the label next to the padding codes
    features.requires_grad_(True)
    out = head(features, targets)
    ref = naive_single(head, features, targets, weights)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, r in zip(grads(out.loss, head, features), grads(ref, head, features)):
        assert torch.allclose(g, r, atol=1e-10)


def test_fp32_head_takes_bf16_features():
    head = MultiHeadCascadeHead(5, 10, multilabel=True, sizes=[4, 3], hidden=4)
    features, targets = make_batch(4, 3, 10, True)
    out = head(features.to(torch.bfloat16), targets)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ------------------------------------------------------------------ prediction
@pytest.mark.parametrize("sizes,c", CASES)
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("k", [4, 30])
def test_predict_with_full_beam_equals_brute_force(sizes, c, multilabel, k):
    head = make_head(sizes, c, multilabel, top_k_groups=100, beam=100)
    features, _ = make_batch(5, 4, c, multilabel)
    scores, ids = head.predict(features, k)
    assert scores.shape == ids.shape == (4, k)
    ref_scores, ref_ids = brute_scores(head, features).topk(min(k, c), dim=1)
    assert torch.equal(ids[:, : min(k, c)], ref_ids)
    assert torch.allclose(scores[:, : min(k, c)], ref_scores, atol=1e-10)
    assert (ids[:, c:] == -1).all() and torch.isneginf(scores[:, c:]).all()  # only k > C pads
    assert ((ids >= 0) & (ids < c) | (ids == -1)).all()


@pytest.mark.parametrize("beam", [1, 2])
def test_single_label_beam_is_exact_over_the_top_beam_groups(beam):
    head = make_head([4, 3], 10, False, beam=beam)
    features, _ = make_batch(6, 5, 10, False)
    scores, ids = head.predict(features, 4)
    full = brute_scores(head, features)
    groups = F.log_softmax(head.group_logits(features), 1).topk(beam, 1).indices
    for i in range(5):
        allowed = [y for y in range(10) if y // 3 in groups[i].tolist()]
        ref = sorted(allowed, key=lambda y: -float(full[i, y]))[:4]
        assert ids[i, : len(ref)].tolist() == ref
        assert (ids[i, len(ref):] == -1).all()


def test_multilabel_predict_keeps_top_k_groups():
    head = make_head([5, 3], 11, True, top_k_groups=2)
    features, _ = make_batch(7, 6, 11, True)
    _, ids = head.predict(features, 6)
    best_groups = head.group_logits(features).topk(2, 1).indices
    for i in range(6):
        assert {y // 3 for y in ids[i].tolist() if y >= 0} <= set(best_groups[i].tolist())
    assert (ids >= 0).sum(1).min() >= 5  # the two groups hold at least 5 labels (group 3 holds 9, 10)


# ------------------------------------------------------------------ it learns
@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention on a shared machine
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("multilabel", [False, True])
def test_training_on_planted_problem_reaches_high_precision(multilabel, one_thread):
    torch.manual_seed(0)
    c, d = 60, 32
    # planted: labels of a group share a centre (what a label clustering would give), plus their own offset
    protos = F.normalize(2 * torch.randn(8, d)[torch.arange(c) // 8] + torch.randn(c, d), dim=1) * 3

    def batch(b):
        if multilabel:  # 1..3 labels per row, features = sum of their prototypes
            labels = torch.rand(b, c).argsort(1)[:, :3]
            labels = labels.masked_fill(torch.arange(3) >= torch.randint(1, 4, (b, 1)), -1)
            feats = (protos[labels.clamp(min=0)] * (labels >= 0).unsqueeze(2)).sum(1)
        else:
            labels = torch.randint(0, c, (b,))
            feats = protos[labels]
        return feats + 0.3 * torch.randn(b, d), labels

    head = create_head("mhc", in_features=d, num_classes=c, multilabel=multilabel, num_groups=8,
                       top_k_groups=3, hidden=32)
    assert head.sizes == [8, 8] and head.num_prefixes == [8, 60]
    feats, labels = batch(500)
    truth = labels if multilabel else labels.unsqueeze(1)
    before = (truth == head.predict(feats, 1)[1]).any(1).float().mean().item()
    opt = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(200):
        loss = head(*batch(64)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    p_at_1 = (truth == head.predict(feats, 1)[1]).any(1).float().mean().item()
    assert before < 0.3 and p_at_1 > 0.9


# ------------------------------------------------------------------ configuration and errors
def test_num_groups_convention_and_factorize_default():
    head = MultiHeadCascadeHead(4, 13, num_groups=5)
    assert head.sizes == [5, 3] and head.group_layer.out_features == 5
    assert MultiHeadCascadeHead(4, 13, num_groups=5, sizes=[5, 3]).sizes == [5, 3]
    head = MultiHeadCascadeHead(4, 1000, num_heads=3, hidden=2)
    assert len(head.sizes) == 3 and math.prod(head.sizes) >= 1000
    assert head.num_prefixes[-1] == 1000 and head.embed[-1].num_embeddings == 1000


def test_more_groups_than_the_labels_fill_warns_with_asked_and_used():
    with pytest.warns(UserWarning, match=r"head\.num_groups=7 asks for 7 groups.*fill only 5; using 5 groups"):
        head = MultiHeadCascadeHead(4, 10, num_groups=7)  # groups of ceil(10/7) = 2 labels: 5 groups hold all 10
    assert head.group_layer.out_features == 5
    from mhe_scale.parallel.sharded_mhc import ShardedMultiHeadCascadeHead

    with pytest.warns(UserWarning, match=r"head\.num_groups=7 asks for 7 groups.*using 5 groups"):
        assert ShardedMultiHeadCascadeHead(4, 10, num_groups=7).group_layer.out_features == 5  # group=None: W=1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiHeadCascadeHead(4, 10, num_groups=5)  # 5 groups of 2: all used, no warning


@pytest.mark.parametrize("kwargs,match", [
    (dict(sizes=[12]), "at least two levels"),
    (dict(sizes=[3, 3]), "encode only prod=9"),
    (dict(sizes=[4, 0, 3]), "every head size"),
    (dict(num_heads=1), "num_heads >= 2"),
    (dict(num_groups=4, sizes=[5, 3]), "disagrees with sizes"),
    (dict(num_groups=4, sizes=[4, 2, 2]), "disagrees with sizes"),
    (dict(num_groups=4, num_heads=3), "implies two levels"),
    (dict(num_groups=0), "num_groups must be in"),
    (dict(num_groups=11), "num_groups must be in"),
    (dict(top_k_groups=0), "top_k_groups must be >= 1"),
    (dict(hidden=0), "hidden must be >= 1"),
    (dict(beam=0), "beam must be >= 1"),
    (dict(sizes=[4, 3], level_weights=[1.0]), "level_weights must be 2 finite"),
    (dict(sizes=[4, 3], level_weights=[-0.1, 1.0]), "level_weights must be 2 finite"),
    (dict(sizes=[4, 3], level_weights=[0.0, 0.0]), "not all zero"),
    (dict(sizes=[4, 3], level_weights=[float("nan"), 1.0]), "level_weights must be 2 finite"),
])
def test_bad_configuration_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadCascadeHead(4, 10, **kwargs)


def test_labels_out_of_range_are_rejected():
    single = MultiHeadCascadeHead(4, 10, sizes=[4, 3], hidden=2)
    with pytest.raises(ValueError, match="label 10 .* outside"):
        single(torch.randn(2, 4), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="label -1 .* outside"):
        single(torch.randn(2, 4), torch.tensor([-1, 2]))
    multi = MultiHeadCascadeHead(4, 10, multilabel=True, sizes=[4, 3], hidden=2)
    with pytest.raises(ValueError, match="label 11 .* outside"):
        multi(torch.randn(2, 4), torch.tensor([[1, -1], [11, 2]]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        multi.predict(torch.randn(2, 4), 0)
