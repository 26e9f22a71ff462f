import math

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.heads import create_head
from mhe_scale.heads.linear import FullyConnectedHead
from mhe_scale.heads.mhp import MultiHeadProductHead
from mhe_scale.labels import LabelCodec, pad_label_lists

torch.set_default_dtype(torch.float32)


def make_batch(seed, b, d, c, multilabel):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, d, generator=gen, dtype=torch.float64)
    if multilabel:
        rows = [torch.randperm(c, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))].tolist()
                for _ in range(b)]
        return features, pad_label_lists(rows)
    return features, torch.randint(0, c, (b,), generator=gen)


# ------------------------------------------------------------------ full FC
def naive_fc_loss(head, features, targets):
    w = head.weight.double()
    total = 0.0
    b = features.shape[0]
    for i in range(b):
        if head.cosine:
            f = features[i] / features[i].norm()
            z = torch.stack([f @ (w[j] / w[j].norm()) for j in range(head.num_classes)])
            y = int(targets[i])
            theta = torch.acos(z[y].clamp(-1 + 1e-7, 1 - 1e-7))
            m1, m2, m3 = head.margin.m1, head.margin.m2, head.margin.m3
            z = torch.cat([z[:y], (torch.cos(m1 * theta + m2) - m3).reshape(1), z[y + 1:]]) * head.margin.scale
        else:
            z = torch.stack([features[i] @ w[j] + head.bias[j] for j in range(head.num_classes)])
        if head.multilabel:
            ys = {int(t) for t in targets[i] if t >= 0}
            for j in range(head.num_classes):
                p = torch.sigmoid(z[j])
                total = total - (torch.log(p) if j in ys else torch.log(1 - p))
        else:
            total = total - (z[int(targets[i])] - torch.logsumexp(z, 0))
    denom = b * head.num_classes if head.multilabel else b
    return total / denom


@pytest.mark.parametrize("kwargs", [dict(), dict(multilabel=True), dict(cosine=True, margin=(1.0, 0.5, 0.0), scale=16.0),
                                    dict(cosine=True, margin=(1.0, 0.0, 0.35), scale=16.0)])
def test_fc_loss_and_grads_match_naive(kwargs):
    head = FullyConnectedHead(6, 9, **kwargs).double()
    features, targets = make_batch(0, 5, 6, 9, kwargs.get("multilabel", False))
    features.requires_grad_(True)
    loss = head(features, targets).loss
    ref = naive_fc_loss(head, features, targets)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    params = [features, head.weight]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, atol=1e-6)


def test_fc_predict_topk():
    head = FullyConnectedHead(4, 7)
    feats = torch.randn(3, 4)
    scores, ids = head.predict(feats, 3)
    logits = head.logits(feats)
    assert torch.equal(ids, logits.topk(3, 1).indices)
    assert torch.allclose(scores.exp().sum(1), F.softmax(logits, 1).topk(3, 1).values.sum(1), atol=1e-6)
    scores, ids = head.predict(feats, 9)  # more than C: padded
    assert ids[:, 7:].tolist() == [[-1, -1]] * 3 and torch.isinf(scores[:, 7:]).all()


def test_fc_margin_needs_cosine():
    with pytest.raises(ValueError, match="needs cosine=True"):
        FullyConnectedHead(4, 7, margin=(1.0, 0.5, 0.0))


# ------------------------------------------------------------------ MHP
def naive_mhp_loss(head, features, targets):
    codec = head.codec
    w, bias = head.linear.weight.double(), head.linear.bias.double()
    z = features @ w.T + bias  # [B, sum c]
    chunks = z.split(head.sizes, 1)
    total = 0.0
    b = features.shape[0]
    for i in range(b):
        labels = [int(t) for t in (targets[i] if head.multilabel else targets[i:i + 1]) if t >= 0]
        digit_sets = [sorted({int(codec.encode(torch.tensor(y))[h]) for y in labels}) for h in range(codec.num_heads)]
        if head.loss_kind == "bce":
            for h, zc in enumerate(chunks):
                for j in range(zc.shape[1]):
                    p = torch.sigmoid(zc[i, j])
                    total = total - (torch.log(p) if j in digit_sets[h] else torch.log(1 - p))
        elif head.loss_kind == "ce":
            for h, zc in enumerate(chunks):
                for d in digit_sets[h]:
                    total = total - (zc[i, d] - torch.logsumexp(zc[i], 0)) / len(digit_sets[h])
        else:  # joint
            lse = torch.logsumexp(z[i], 0)
            n = sum(len(s) for s in digit_sets)
            for h, s in enumerate(digit_sets):
                for d in s:
                    total = total - (z[i, head.offsets[h] + d] - lse) / n
    if head.loss_kind == "bce":
        return total / (b * sum(head.sizes))
    return total / b


@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("loss", ["ce", "bce", "joint"])
@pytest.mark.parametrize("sizes,num_classes", [([4, 3], 10), ([3, 2, 3], 17)])
def test_mhp_loss_and_grads_match_naive(multilabel, loss, sizes, num_classes):
    head = MultiHeadProductHead(5, num_classes, multilabel=multilabel, sizes=sizes, loss=loss).double()
    features, targets = make_batch(3, 6, 5, num_classes, multilabel)
    features.requires_grad_(True)
    out = head(features, targets).loss
    ref = naive_mhp_loss(head, features, targets)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    params = [features, head.linear.weight, head.linear.bias]
    for g, r in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(g.double(), r, atol=1e-6)


@pytest.mark.parametrize("loss", ["ce", "bce", "joint"])
def test_mhp_predict_equals_brute_force_over_all_labels(loss):
    num_classes, sizes = 23, [5, 5]
    head = MultiHeadProductHead(8, num_classes, sizes=sizes, loss=loss)
    feats = torch.randn(4, 8)
    digits = LabelCodec(sizes, num_classes).encode(torch.arange(num_classes))
    per_head = head.head_scores(feats)
    full = sum(per_head[h][:, digits[:, h]] for h in range(2))  # [B, C] over valid labels only
    ref_scores, ref_ids = full.topk(6, 1)
    scores, ids = head.predict(feats, 6)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert int(ids.max()) < num_classes


def test_mhp_parameter_count_is_sum_of_sizes():
    head = MultiHeadProductHead(512, 1_000_000, num_heads=2)
    assert head.sizes == [1000, 1000]
    assert sum(p.numel() for p in head.parameters()) == 512 * 2000 + 2000


def test_mhp_errors():
    with pytest.raises(ValueError, match="mhp loss must be one of"):
        MultiHeadProductHead(4, 10, loss="focal")
    with pytest.raises(ValueError, match="encode only prod=9"):
        MultiHeadProductHead(4, 10, sizes=[3, 3])
    head = MultiHeadProductHead(4, 10, sizes=[4, 3])
    with pytest.raises(ValueError, match=r"label 10 at position \(1,\)"):
        head(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"expects features \[B, 4\]"):
        head(torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expects targets \[B\]"):
        head(torch.randn(2, 4), torch.tensor([[1, 2], [3, -1]]))


def test_mhp_learns_a_planted_problem():
    torch.manual_seed(0)
    num_classes, dim = 400, 32
    head = create_head("mhp", in_features=dim, num_classes=num_classes, num_heads=2)
    # a linear MHP head needs features that carry each digit linearly: center = A[d0] + B[d1]
    digits = head.codec.encode(torch.arange(num_classes))
    centers = torch.randn(head.sizes[0], dim)[digits[:, 0]] + torch.randn(head.sizes[1], dim)[digits[:, 1]]
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        y = torch.randint(0, num_classes, (128,))
        x = centers[y] + 0.1 * torch.randn(128, dim)
        opt.zero_grad()
        head(x, y).loss.backward()
        opt.step()
    y = torch.arange(num_classes)
    _, ids = head.predict(centers[y] + 0.1 * torch.randn(num_classes, dim), 1)
    assert (ids[:, 0] == y).float().mean() > 0.9
