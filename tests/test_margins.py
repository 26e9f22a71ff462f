import math

import pytest
import torch

from mhe_scale.heads.margins import CombinedMargin, make_margin


THETA = torch.linspace(0, math.pi, 20001, dtype=torch.float64)


def target_logits(margin: CombinedMargin) -> torch.Tensor:
    """The target logit at every angle of THETA (one row per angle, target column 0)."""
    cos = torch.stack([torch.cos(THETA), torch.zeros_like(THETA)], dim=1)
    return margin(cos, torch.zeros(len(THETA), dtype=torch.long))[:, 0]


def rises(logits: torch.Tensor) -> float:
    """Largest increase of the logit from one angle to the next (0 for a non-increasing curve)."""
    return float(logits.diff().clamp(min=0).max())


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2), (0.9, 0.4, 0.15),
                               (1.0, 1.2, 0.0), (1.0, 0.0, 0.0)],
                         ids=["arcface", "cosface", "combined", "combined_m1_0.9", "arcface_wide", "none"])
@pytest.mark.parametrize("straight_through", [False, True])
def test_target_logit_never_rises_with_the_angle(m, straight_through):
    logits = target_logits(CombinedMargin(30.0, *m, straight_through=straight_through))
    assert torch.isfinite(logits).all()
    assert rises(logits) <= 1e-9, m
    if m != (1.0, 0.0, 0.0):  # a margin lowers the target logit below s * cos somewhere, never raises it
        plain = 30.0 * torch.cos(THETA)
        assert (logits <= plain + 1e-9).all() and (logits < plain - 1e-3).any()


def test_every_accepted_margin_is_monotone_and_the_others_are_refused():
    """A sweep over (m1, m2, m3): each margin is either refused with a clear error or gives a target
    logit that never rises with theta in [0, pi]."""
    accepted, refused = [], []
    for m1 in torch.linspace(0.25, 2.0, 15).tolist():
        for m2 in torch.linspace(-0.3, 3.3, 19).tolist():
            for m3 in (0.0, 0.35):
                try:
                    margin = CombinedMargin(16.0, m1, m2, m3)
                except ValueError as exc:
                    assert "margin (m1, m2, m3)" in str(exc)
                    refused.append((m1, m2, m3))
                    continue
                assert rises(target_logits(margin)) <= 1e-9, (m1, m2, m3)
                accepted.append((m1, m2, m3))
    assert len(accepted) > 100 and len(refused) > 100  # the sweep covers both sides


@pytest.mark.parametrize("m, message", [((1.2, 0.0, 0.0), "not monotone"), ((2.0, 0.1, 0.0), "not monotone"),
                                        ((1.0, 2.8, 0.0), "not monotone"), ((1.0, -0.1, 0.0), "m2=-0.1"),
                                        ((0.0, 0.5, 0.0), "m1=0.0")])
def test_non_monotone_margins_are_refused(m, message):
    with pytest.raises(ValueError, match=message):
        CombinedMargin(64.0, *m)
    with pytest.raises(ValueError, match=message):
        make_margin("combined", margin=m)


def test_margin_at_known_angles_and_bool_mask_path():
    """ArcFace m=0.5 at theta = pi/3 is s*cos(pi/3 + 0.5); CosFace subtracts m3; columns that are not
    targets (or rows with target -1) keep s*cos; a BoolTensor mask gives the same logits."""
    cos = torch.tensor([[0.5, 0.1, -0.2], [0.3, 0.9, 0.0], [0.7, 0.2, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 1, -1])
    arc = CombinedMargin(10.0, 1.0, 0.5, 0.0)(cos, targets)
    expected = 10.0 * cos.clone()
    expected[0, 0] = 10.0 * math.cos(math.pi / 3 + 0.5)
    expected[1, 1] = 10.0 * math.cos(math.acos(0.9) + 0.5)
    torch.testing.assert_close(arc, expected, rtol=0, atol=1e-9)
    mask = torch.tensor([[True, False, False], [False, True, False], [False, False, False]])
    torch.testing.assert_close(CombinedMargin(10.0, 1.0, 0.5, 0.0)(cos, mask), arc, rtol=0, atol=1e-12)
    cosface = CombinedMargin(10.0, 1.0, 0.0, 0.4)(cos, targets)
    assert cosface[0, 0].item() == pytest.approx(1.0) and cosface[1, 1].item() == pytest.approx(5.0)


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
