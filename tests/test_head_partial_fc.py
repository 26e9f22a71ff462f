import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhe_scale.heads.base import create_head
from mhe_scale.heads.linear import FullyConnectedHead
from mhe_scale.heads.partial_fc import PartialFCHead, sample_classes


def _naive_loss(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, kept: list[int],
                s: float, margin: tuple[float, float, float], straight_through: bool = False) -> torch.Tensor:
    """Row by row, class by class: CE over the kept classes with the margin on the label."""
    total = features.new_zeros(())
    for b in range(features.shape[0]):
        f = features[b] / features[b].norm()
        logits = []
        for cls in kept:
            w = weight[cls] / weight[cls].norm()
            cos = (f * w).sum()
            if cls == int(labels[b]):
                c = cos.clamp(-1 + 1e-7, 1 - 1e-7)
                angle = margin[0] * torch.acos(c) + margin[1]
                if float(angle.detach()) <= math.pi:
                    z = s * (torch.cos(angle) - margin[2])
                else:
                    z = s * (cos - margin[2] - margin[1] * math.sin(margin[1]))
                logits.append(s * cos + (z - s * cos).detach() if straight_through else z)
            else:
                logits.append(s * cos)
        z = torch.stack(logits)
        total = total - (z[kept.index(int(labels[b]))] - torch.logsumexp(z, 0))
    return total / features.shape[0]


# ------------------------------------------------------------------ sample_classes
@settings(max_examples=150, deadline=None)
@given(num_classes=st.integers(1, 40), data=st.data())
def test_sample_classes_keeps_positives_and_remaps(num_classes, data):
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=30)))
    num_sample = data.draw(st.integers(1, num_classes + 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    kept, cols = sample_classes(labels, num_classes, num_sample, gen)
    positives = set(labels.tolist())
    assert kept.numel() == min(num_classes, max(len(positives), num_sample))
    assert kept.tolist() == sorted(set(kept.tolist()))  # sorted, distinct
    assert int(kept.min()) >= 0 and int(kept.max()) < num_classes
    assert positives <= set(kept.tolist())
    assert torch.equal(kept[cols], labels)


def test_sample_classes_full_rate_is_identity_without_drawing():
    labels = torch.tensor([4, 0, 4, 2])
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    kept, cols = sample_classes(labels, 5, 5, gen)
    assert kept.tolist() == [0, 1, 2, 3, 4] and cols.tolist() == [4, 0, 4, 2]
    assert torch.equal(gen.get_state(), state)


def test_sample_classes_labels_not_here_are_ignored():
    # a shard owning local ids [0, 6): other shards' labels arrive as negative or >= 6
    labels = torch.tensor([-3, 2, 7, 2, 5])
    kept, cols = sample_classes(labels, 6, 2, torch.Generator().manual_seed(0))
    assert kept.tolist() == [2, 5]
    assert cols.tolist() == [-1, 0, -1, 0, 1]


def test_sample_classes_negatives_are_uniform():
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 1])
    counts = torch.zeros(20)
    draws = 3000
    for _ in range(draws):
        kept, _ = sample_classes(labels, 20, 6, gen)
        counts[kept] += 1
    assert counts[:2].tolist() == [draws, draws]
    expected = draws * 4 / 18
    assert float((counts[2:] / expected - 1).abs().max()) < 0.15


def test_sample_classes_is_reproducible_with_a_generator():
    labels = torch.tensor([3, 9, 3])
    a = sample_classes(labels, 50, 10, torch.Generator().manual_seed(7))
    b = sample_classes(labels, 50, 10, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ the head
# (1.0, 1.5, 0.0): the target logit takes the fallback past pi where cos < cos(pi - 1.5) = -0.07
@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 1.5, 0.0)])
@pytest.mark.parametrize("straight_through", [False, True])
def test_partial_fc_loss_and_grads_equal_naive_reference(margin, straight_through):
    torch.manual_seed(0)
    head = PartialFCHead(8, 30, margin=margin, scale=16.0, sample_rate=0.2,
                         margin_straight_through=straight_through).double()
    head.generator = torch.Generator().manual_seed(11)
    state = head.generator.get_state()
    features = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 3, 17, 29, 0, 17, 8])
    out = head(features, labels)
    out.loss.backward()

    kept, _ = sample_classes(labels, 30, 6, torch.Generator().set_state(state))
    assert int(out.metrics["kept_classes"]) == kept.numel() == 6
    w64 = head.weight.detach().clone().requires_grad_()
    f64 = features.detach().clone().requires_grad_()
    ref = _naive_loss(w64, f64, labels, kept.tolist(), 16.0, margin, straight_through)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-10)
    ref.backward()
    torch.testing.assert_close(head.weight.grad, w64.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(features.grad, f64.grad, rtol=1e-8, atol=1e-10)
    not_kept = torch.ones(30, dtype=torch.bool)
    not_kept[kept] = False
    assert float(head.weight.grad[not_kept].abs().max()) == 0.0


def test_more_positives_than_sample_rate_keeps_them_all():
    head = PartialFCHead(4, 40, sample_rate=0.05)  # ceil(0.05 * 40) = 2
    labels = torch.tensor([1, 5, 9, 13, 5])
    out = head(torch.randn(5, 4), labels)
    assert int(out.metrics["kept_classes"]) == 4


@pytest.mark.parametrize("margin", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), None])
def test_sample_rate_one_is_the_full_cosine_margin_softmax(margin):
    torch.manual_seed(1)
    pfc = PartialFCHead(6, 13, margin=margin, scale=32.0, sample_rate=1.0)
    fc = FullyConnectedHead(6, 13, cosine=True, margin=margin, scale=32.0)
    with torch.no_grad():
        fc.weight.copy_(pfc.weight)
    features = torch.randn(9, 6)
    labels = torch.randint(0, 13, (9,))
    f1, f2 = features.clone().requires_grad_(), features.clone().requires_grad_()
    out = pfc(f1, labels)
    ref = fc(f2, labels).loss
    out.loss.backward()
    ref.backward()
    assert int(out.metrics["kept_classes"]) == 13
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(pfc.weight.grad, fc.weight.grad)
    torch.testing.assert_close(f1.grad, f2.grad)


def test_eval_mode_and_predict_use_all_classes():
    torch.manual_seed(2)
    head = PartialFCHead(5, 11, sample_rate=0.1)
    fc = FullyConnectedHead(5, 11, cosine=True, margin=(1.0, 0.5, 0.0))
    with torch.no_grad():
        fc.weight.copy_(head.weight)
    features, labels = torch.randn(4, 5), torch.tensor([0, 10, 3, 3])
    head.eval()
    out = head(features, labels)
    assert int(out.metrics["kept_classes"]) == 11
    torch.testing.assert_close(out.loss, fc(features, labels).loss)
    scores, ids = head.predict(features, 15)
    brute = torch.log_softmax(64.0 * torch.nn.functional.normalize(features) @
                              torch.nn.functional.normalize(head.weight).T, dim=1)
    ref_scores, ref_ids = brute.topk(11, dim=1)
    assert torch.equal(ids[:, :11], ref_ids) and (ids[:, 11:] == -1).all()
    torch.testing.assert_close(scores[:, :11], ref_scores)
    assert torch.isinf(scores[:, 11:]).all()


def test_registry_and_errors():
    head = create_head("partial_fc", in_features=4, num_classes=10, sample_rate=0.5)
    assert isinstance(head, PartialFCHead) and head.num_sample == 5
    with pytest.raises(ValueError, match="single-label"):
        PartialFCHead(4, 10, multilabel=True)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            PartialFCHead(4, 10, sample_rate=bad)
    with pytest.raises(ValueError, match=r"\(m1, m2, m3\)"):
        PartialFCHead(4, 10, margin=(0.5,))
    with pytest.raises(ValueError, match="label 10"):
        head(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="targets"):
        head(torch.randn(2, 4), torch.tensor([[1], [2]]))
