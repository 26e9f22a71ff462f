import math

import pytest
import torch
import torch.nn.functional as F

import mhe_scale.heads.mhs as mhs_module
from mhe_scale.heads.base import create_head
from mhe_scale.heads.linear import FullyConnectedHead
from mhe_scale.heads.mhs import MultiHeadSamplingHead, sample_groups_per_row
from mhe_scale.heads.partial_fc import sample_classes


ARCFACE, COSFACE = (1.0, 0.5, 0.0), (1.0, 0.0, 0.35)
CASES = [  # (cosine, margin)
    (False, None), (True, None), (True, ARCFACE), (True, COSFACE)]


def _naive_logit(w: torch.Tensor, b: torch.Tensor | None, f: torch.Tensor, is_target: bool,
                 cosine: bool, margin, scale: float) -> torch.Tensor:
    """One logit, written out: plain dot (+ bias) or scaled cosine with the combined margin."""
    if not cosine:
        return (w * f).sum() + (0.0 if b is None else b)
    cos = (w / w.norm() * f / f.norm()).sum()
    m1, m2, m3 = margin if margin is not None else (1.0, 0.0, 0.0)
    if not is_target or (m1, m2, m3) == (1.0, 0.0, 0.0):
        return scale * cos
    angle = m1 * torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) + m2
    if float(angle.detach()) <= math.pi:
        return scale * (torch.cos(angle) - m3)
    return scale * (cos - m3 - m2 * math.sin(m2))


def _naive_loss(weight, bias, features, labels, row_codes, num_classes, cosine, margin, scale):
    """Loop over rows and over each row's codes; padding codes are left out of the softmax."""
    c2 = weight.shape[1]
    total = features.new_zeros(())
    for i in range(features.shape[0]):
        y = int(labels[i])
        codes = [c for c in row_codes[i] if c < num_classes]
        z = torch.stack([_naive_logit(weight[c // c2, c % c2], None if bias is None else bias[c // c2, c % c2],
                                      features[i], c == y, cosine, margin, scale) for c in codes])
        total = total - (z[codes.index(y)] - torch.logsumexp(z, 0))
    return total / features.shape[0]


def _fc_twin(head: MultiHeadSamplingHead, margin, scale: float) -> FullyConnectedHead:
    """The fc head with the same weights on the C valid codes."""
    c = head.num_classes
    fc = FullyConnectedHead(head.in_features, c, cosine=head.cosine, margin=margin, scale=scale,
                            bias=head.bias is not None)
    with torch.no_grad():
        fc.weight.copy_(head.weight.flatten(0, 1)[:c])
        if head.bias is not None:
            fc.bias.copy_(head.bias.flatten()[:c])
    return fc


# ------------------------------------------------------------------ sampling
def test_per_row_groups_hold_the_true_group_first_and_are_distinct():
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 9, (200,), generator=gen)
    picked = sample_groups_per_row(groups, 9, 4, gen)
    assert picked.shape == (200, 4)
    assert torch.equal(picked[:, 0], groups)
    assert int(picked.min()) >= 0 and int(picked.max()) < 9
    assert all(len(set(row)) == 4 for row in picked.tolist())
    assert sample_groups_per_row(groups, 9, 50, gen).shape == (200, 9)  # clamped: every group


def test_per_row_negative_groups_are_uniform():
    gen = torch.Generator().manual_seed(1)
    groups = torch.zeros(6000, dtype=torch.long)
    picked = sample_groups_per_row(groups, 7, 3, gen)[:, 1:]
    counts = torch.bincount(picked.flatten(), minlength=7).float()
    assert counts[0] == 0
    expected = 6000 * 2 / 6
    assert float((counts[1:] / expected - 1).abs().max()) < 0.1


def test_batch_union_softmax_covers_exactly_the_batch_groups():
    torch.manual_seed(0)
    head = MultiHeadSamplingHead(4, 47, sizes=(10, 5), mode="batch_union", num_sampled_groups=1)
    labels = torch.tensor([3, 4, 46, 21, 22, 3])
    _, cols, codes = head.sampled_logits(torch.randn(6, 4), labels)
    assert sorted(set((codes // 5).tolist())) == [0, 4, 9]
    assert codes.tolist() == sorted(codes.tolist()) and codes.numel() == 15
    assert torch.equal(codes[cols], labels)
    # more groups wanted than present: topped up with distinct other groups, still sorted
    head = MultiHeadSamplingHead(4, 47, sizes=(10, 5), mode="batch_union", num_sampled_groups=6)
    _, cols, codes = head.sampled_logits(torch.randn(6, 4), labels)
    groups = (codes // 5).unique()
    assert groups.numel() == 6 and {0, 4, 9} <= set(groups.tolist())
    assert torch.equal(codes[cols], labels)


def test_per_sample_codes_name_each_rows_columns():
    torch.manual_seed(0)
    head = MultiHeadSamplingHead(4, 47, sizes=(10, 5), num_sampled_groups=3)
    labels = torch.tensor([3, 46, 21, 0])
    logits, cols, codes = head.sampled_logits(torch.randn(4, 4), labels)
    assert logits.shape == codes.shape == (4, 15)
    assert torch.equal(codes.gather(1, cols.unsqueeze(1)).squeeze(1), labels)
    assert all(len({c // 5 for c in row}) == 3 for row in codes.tolist())


# ------------------------------------------------------------------ losses against references
@pytest.mark.parametrize("mode", ["per_sample", "batch_union"])
@pytest.mark.parametrize("cosine,margin", CASES)
@pytest.mark.parametrize("sizes,num_classes", [((5, 5), 23), ((6, 5), 23), ((4, 3), 12)])
def test_all_groups_equals_the_full_softmax(mode, cosine, margin, sizes, num_classes):
    torch.manual_seed(3)
    scale = 16.0
    head = MultiHeadSamplingHead(6, num_classes, sizes=sizes, mode=mode, num_sampled_groups=sizes[0],
                                 cosine=cosine, margin=margin, scale=scale, bias=not cosine)
    if head.bias is not None:
        torch.nn.init.normal_(head.bias)
    with torch.no_grad():  # padding rows large enough to show up if they ever leaked in
        head.weight.flatten(0, 1)[num_classes:] = 50.0
    fc = _fc_twin(head, margin, scale)
    features = torch.randn(10, 6)
    labels = torch.randint(0, num_classes, (10,))
    labels[0] = num_classes - 1
    f1, f2 = features.clone().requires_grad_(), features.clone().requires_grad_()
    loss = head(f1, labels).loss
    ref = fc(f2, labels).loss
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    grad = head.weight.grad.flatten(0, 1)
    torch.testing.assert_close(grad[:num_classes], fc.weight.grad, rtol=1e-4, atol=1e-6)
    assert bool((grad[num_classes:] == 0).all())  # padding codes: no gradient
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    if head.bias is not None:
        torch.testing.assert_close(head.bias.grad.flatten()[:num_classes], fc.bias.grad, rtol=1e-4, atol=1e-6)
    head.eval()  # eval forward is the full classifier too
    torch.testing.assert_close(head(features, labels).loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["per_sample", "batch_union"])
@pytest.mark.parametrize("cosine,margin", CASES)
def test_sampled_loss_and_grads_equal_naive_reference(mode, cosine, margin):
    torch.manual_seed(4)
    num_classes, sizes, m = 33, (7, 5), 3
    head = MultiHeadSamplingHead(5, num_classes, sizes=sizes, mode=mode, num_sampled_groups=m,
                                 cosine=cosine, margin=margin, scale=8.0, bias=not cosine).double()
    if head.bias is not None:
        torch.nn.init.normal_(head.bias)
    head.generator = torch.Generator().manual_seed(5)
    state = head.generator.get_state()
    features = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([32, 0, 17, 30, 31, 4])  # group 6 holds 30..32 and padding 33, 34
    out = head(features, labels)
    out.loss.backward()

    gen = torch.Generator().set_state(state)
    if mode == "per_sample":
        groups = sample_groups_per_row(labels // 5, 7, m, gen).tolist()
    else:
        kept, _ = sample_classes(labels // 5, 7, m, gen)
        groups = [kept.tolist()] * len(labels)
    row_codes = [[g * 5 + r for g in row for r in range(5)] for row in groups]
    assert int(out.metrics["softmax_columns"]) == len(row_codes[0])
    w64 = head.weight.detach().clone().requires_grad_()
    b64 = None if head.bias is None else head.bias.detach().clone().requires_grad_()
    f64 = features.detach().clone().requires_grad_()
    ref = _naive_loss(w64, b64, f64, labels, row_codes, num_classes, cosine, margin, 8.0)
    ref.backward()
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, w64.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(features.grad, f64.grad, rtol=1e-8, atol=1e-10)
    if b64 is not None:
        torch.testing.assert_close(head.bias.grad, b64.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["per_sample", "batch_union"])
def test_padding_codes_never_get_probability(mode):
    torch.manual_seed(5)
    head = MultiHeadSamplingHead(4, 9, sizes=(4, 4), mode=mode, num_sampled_groups=2)  # codes 9..15 pad
    with torch.no_grad():
        head.weight.flatten(0, 1)[9:] = 100.0
    labels = torch.tensor([8, 8, 0, 5, 7])
    features = torch.randn(5, 4).abs()
    logits, _, codes = head.sampled_logits(features, labels)
    probs = logits.detach().softmax(dim=1)
    pad = (codes >= 9).expand_as(probs)
    assert bool(pad.any()) and float(probs[pad].max()) == 0.0
    assert torch.isfinite(head(features, labels).loss)
    ids = head.predict(features, 9)[1]
    assert sorted(ids[0].tolist()) == list(range(9))  # exactly the valid labels, however large pad rows score


# ------------------------------------------------------------------ predict
@pytest.mark.parametrize("cosine,margin", [(False, None), (True, ARCFACE)])
@pytest.mark.parametrize("chunk", [1 << 16, 4, 7])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_predict_equals_brute_force(monkeypatch, cosine, margin, chunk, k):
    monkeypatch.setattr(mhs_module, "PREDICT_CHUNK_COLUMNS", chunk)
    torch.manual_seed(6)
    head = MultiHeadSamplingHead(6, 29, sizes=(6, 5), cosine=cosine, margin=margin, bias=not cosine)
    if head.bias is not None:
        torch.nn.init.normal_(head.bias)
    features = torch.randn(8, 6)
    w = head.weight.flatten(0, 1)[:29]
    if cosine:
        full = 64.0 * F.normalize(features) @ F.normalize(w).T
    else:
        full = features @ w.T + head.bias.flatten()[:29]
    ref_scores, ref_ids = full.log_softmax(dim=1).topk(min(k, 29), dim=1)
    scores, ids = head.predict(features, k)
    assert scores.shape == ids.shape == (8, k)
    assert torch.equal(ids[:, :29], ref_ids)
    torch.testing.assert_close(scores[:, :29], ref_scores, rtol=1e-5, atol=1e-5)
    assert (ids[:, 29:] == -1).all() and torch.isinf(scores[:, 29:]).all()


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("mode,cosine,margin,scale", [("per_sample", False, None, 1.0),
                                                      ("batch_union", True, COSFACE, 16.0)])
def test_learns_a_planted_problem(mode, cosine, margin, scale):
    torch.manual_seed(7)
    num_classes, dim = 50, 16
    centers = F.normalize(torch.randn(num_classes, dim), dim=1) * 3.0
    head = MultiHeadSamplingHead(dim, num_classes, sizes=(8, 7), mode=mode, num_sampled_groups=2,
                                 cosine=cosine, margin=margin, scale=scale)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        labels = torch.randint(0, num_classes, (64,))
        loss = head(centers[labels] + 0.3 * torch.randn(64, dim), labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    labels = torch.randint(0, num_classes, (500,))
    ids = head.predict(centers[labels] + 0.3 * torch.randn(500, dim), 1)[1][:, 0]
    assert float((ids == labels).float().mean()) > 0.95


# ------------------------------------------------------------------ construction
def test_defaults_registry_and_errors():
    head = create_head("mhs", in_features=4, num_classes=1000)
    assert isinstance(head, MultiHeadSamplingHead)
    assert math.prod(head.sizes) >= 1000 and head.weight.shape == (*head.sizes, 4)
    assert MultiHeadSamplingHead(4, 20, sizes=(5, 4), num_sampled_groups=99).num_sampled_groups == 5
    assert MultiHeadSamplingHead(4, 20, sizes=(10, 3)).num_valid_groups == 7  # groups 7..9 only padding
    with pytest.raises(ValueError, match="exactly two sizes"):
        MultiHeadSamplingHead(4, 20, sizes=(3, 3, 3))
    with pytest.raises(ValueError, match="encode only"):
        MultiHeadSamplingHead(4, 20, sizes=(4, 4))
    with pytest.raises(ValueError, match="mode"):
        MultiHeadSamplingHead(4, 20, mode="union")
    with pytest.raises(ValueError, match="num_sampled_groups"):
        MultiHeadSamplingHead(4, 20, num_sampled_groups=0)
    with pytest.raises(ValueError, match="single-label"):
        MultiHeadSamplingHead(4, 20, multilabel=True)
    with pytest.raises(ValueError, match="cosine=True"):
        MultiHeadSamplingHead(4, 20, margin=ARCFACE)
    head = MultiHeadSamplingHead(4, 20, sizes=(5, 4))
    with pytest.raises(ValueError, match="label 20"):
        head(torch.randn(2, 4), torch.tensor([3, 20]))
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 5), torch.tensor([3, 2]))


@pytest.mark.parametrize("mode", ["per_sample", "batch_union"])
def test_straight_through_margin_matches_the_fc_head(mode):
    torch.manual_seed(8)
    head = MultiHeadSamplingHead(6, 23, sizes=(5, 5), mode=mode, num_sampled_groups=5, cosine=True,
                                 margin=ARCFACE, scale=16.0, margin_straight_through=True)
    fc = FullyConnectedHead(6, 23, cosine=True, margin=ARCFACE, scale=16.0, margin_straight_through=True)
    plain = FullyConnectedHead(6, 23, cosine=True, margin=ARCFACE, scale=16.0)
    with torch.no_grad():
        fc.weight.copy_(head.weight.flatten(0, 1)[:23])
        plain.weight.copy_(fc.weight)
    features, labels = torch.randn(8, 6), torch.randint(0, 23, (8,))
    for module in (head, fc, plain):
        module(features, labels).loss.backward()
    grad = head.weight.grad.flatten(0, 1)[:23]
    torch.testing.assert_close(grad, fc.weight.grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grad, plain.weight.grad, rtol=1e-3, atol=1e-5)  # the flag changes gradients
