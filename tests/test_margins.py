import math

import pytest
import torch

from mhe_scale.heads.margins import CombinedMargin, make_margin


def naive_margin(cos, targets, s, m1, m2, m3):
    out = cos.clone() * s
    for i in range(cos.shape[0]):
        j = int(targets[i])
        if j < 0:
            continue
        theta = math.acos(max(-1 + 1e-7, min(1 - 1e-7, float(cos[i, j]))))
        angle = m1 * theta + m2
        if angle <= math.pi:
            out[i, j] = s * (math.cos(angle) - m3)
        else:
            out[i, j] = s * (float(cos[i, j]) - m3 - m2 * math.sin(m2))
    return out


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (1.2, 0.0, 0.0), (1.0, 0.0, 0.0)])
def test_combined_margin_matches_formula(m):
    gen = torch.Generator().manual_seed(1)
    cos = torch.rand(7, 5, generator=gen, dtype=torch.float64) * 2 - 1
    cos[0, 2] = -0.999  # theta near pi: exercises the monotone fallback for arc margins
    targets = torch.tensor([2, 0, -1, 4, 1, 3, 0])
    margin = CombinedMargin(30.0, *m)
    got = margin(cos, targets)
    assert torch.allclose(got, naive_margin(cos, targets, 30.0, *m), atol=1e-9)
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask[torch.arange(7)[targets >= 0], targets[targets >= 0]] = True
    assert torch.allclose(margin(cos, mask), got, atol=1e-12)  # bool-mask path agrees


def test_named_margins():
    cos = torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    arc = make_margin("arcface", scale=64, margin=0.5)(cos, torch.tensor([0]))
    assert arc[0, 0].item() == pytest.approx(64 * math.cos(math.acos(0.5) + 0.5))
    assert arc[0, 1].item() == pytest.approx(6.4)
    cosface = make_margin("cosface", scale=64, margin=0.4)(cos, torch.tensor([0]))
    assert cosface[0, 0].item() == pytest.approx(64 * 0.1)
    with pytest.raises(ValueError, match="unknown margin 'sphere'"):
        make_margin("sphere")
    with pytest.raises(ValueError, match=r"needs margin=\(m1, m2, m3\)"):
        make_margin("combined", margin=0.5)


def test_straight_through_changes_gradient_not_value():
    cos = torch.tensor([[0.3, 0.6]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0])
    plain = CombinedMargin(10.0, 1.0, 0.5, 0.0)
    st = CombinedMargin(10.0, 1.0, 0.5, 0.0, straight_through=True)
    out_plain, out_st = plain(cos, targets), st(cos, targets)
    assert torch.allclose(out_plain, out_st)
    (g_plain,) = torch.autograd.grad(out_plain[0, 0], cos)
    (g_st,) = torch.autograd.grad(out_st[0, 0], cos)
    assert g_st[0, 0].item() == pytest.approx(10.0)  # identity times scale
    theta = math.acos(0.3)
    assert g_plain[0, 0].item() == pytest.approx(10.0 * math.sin(theta + 0.5) / math.sin(theta))


def test_margin_does_not_modify_input():
    cos = torch.rand(3, 4)
    before = cos.clone()
    CombinedMargin(64.0, 1.0, 0.5, 0.0)(cos, torch.tensor([0, 1, 2]))
    assert torch.equal(cos, before)
