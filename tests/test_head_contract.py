"""Every registered head honours the shared interface (parametrised over the registry)."""

import pytest
import torch

from mhe_scale.heads import create_head, list_heads
from mhe_scale.labels import pad_label_lists

MULTILABEL = {"fc", "mhp", "mhc"}  # heads whose method is defined for multi-label targets


def cases():
    for name in list_heads():
        yield name, False
        if name in MULTILABEL:
            yield name, True


@pytest.mark.parametrize("name,multilabel", list(cases()))
def test_head_contract(name, multilabel):
    torch.manual_seed(0)
    num_classes, dim = 23, 8  # 23 is prime: every factorisation has padding codes
    head = create_head(name, in_features=dim, num_classes=num_classes, multilabel=multilabel)
    features = torch.randn(5, dim, requires_grad=True)
    targets = pad_label_lists([[1, 22], [0], [], [7, 8, 9], [22]]) if multilabel else torch.tensor([1, 22, 0, 7, 13])
    out = head(features, targets)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    head.eval()
    scores, ids = head.predict(features.detach(), 4)
    assert scores.shape == ids.shape == (5, 4)
    assert ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < num_classes)).all()  # global ids, padding codes never returned
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    assert all(len(set(row)) == 4 for row in ids.tolist())


@pytest.mark.parametrize("name", list_heads())
def test_head_rejects_out_of_range_labels(name):
    head = create_head(name, in_features=4, num_classes=10)
    with pytest.raises(ValueError, match=r"label 10 .* outside \[0, 10\)"):
        head(torch.randn(2, 4), torch.tensor([3, 10]))


@pytest.mark.parametrize("name", list_heads())
def test_bf16_features_give_fp32_loss(name):
    head = create_head(name, in_features=8, num_classes=23)
    out = head(torch.randn(4, 8).bfloat16(), torch.tensor([0, 5, 22, 9]))
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("name", list_heads())
def test_a_head_called_inside_autocast_computes_in_fp32(name):
    kwargs = {"cosine": True, "margin": [1.0, 0.5, 0.0]} if name in ("fc", "mhs") else {}
    torch.manual_seed(0)
    head = create_head(name, in_features=8, num_classes=23, **kwargs)
    features, targets = torch.randn(6, 8), torch.tensor([0, 5, 22, 9, 9, 1])
    torch.manual_seed(1)  # sampling heads draw the same groups / negatives in both calls
    plain = head(features, targets).loss
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(features, targets).loss
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)
