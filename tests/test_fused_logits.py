"""The fused autograd functions of the cosine heads against the plain autograd graphs they replace:
cosine_similarity (_CosineColumns) vs F.normalize on both sides, and the target-column margin
(_TargetColumnMargin) vs gather + margin + scatter; values and gradients, fp64, with rows that have no
target, a zero weight row, angles past the ArcFace fallback, and autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.heads.linear import cosine_similarity
from mhe_scale.heads.margins import CombinedMargin


def naive_margin(margin: CombinedMargin, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    has = targets >= 0
    col = targets.clamp(min=0).unsqueeze(1)
    picked = cos.gather(1, col)
    tgt = torch.where(has.unsqueeze(1), margin.target_logit(picked), picked)
    return cos.scatter(1, col, tgt) * margin.scale


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.4, 0.15), (1.0, 0.3, 0.2), (1.0, 0.0, 0.0)])
@pytest.mark.parametrize("straight_through", [False, True])
def test_target_column_margin_equals_gather_scatter(m, straight_through):
    margin = CombinedMargin(64.0, *m, straight_through=straight_through)
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(9, 13, generator=g, dtype=torch.float64) * 2 - 1
    targets = torch.randint(0, 13, (9,), generator=g)
    targets[2] = -1  # a row whose target lives elsewhere
    cos[0, targets[0]] = -0.999  # past pi - m2: the fallback branch
    grad = torch.randn(9, 13, generator=g, dtype=torch.float64)
    a, b = cos.clone().requires_grad_(), cos.clone().requires_grad_()
    out_a, out_b = margin(a, targets), naive_margin(margin, b, targets)
    (out_a * grad).sum().backward()
    (out_b * grad).sum().backward()
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_cosine_columns_equal_normalize_both_sides():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64)
    grad = torch.randn(7, 11, generator=g, dtype=torch.float64)
    fa, wa = f.clone().requires_grad_(), w.clone().requires_grad_()
    fb, wb = f.clone().requires_grad_(), w.clone().requires_grad_()
    out_a = cosine_similarity(fa, wa)
    out_b = F.normalize(fb, dim=1) @ F.normalize(wb, dim=1).t()
    (out_a * grad).sum().backward()
    (out_b * grad).sum().backward()
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-14)
    torch.testing.assert_close(fa.grad, fb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(cosine_similarity, (f[:3].clone().requires_grad_(), w[:4].clone().requires_grad_()))


def test_cosine_columns_zero_row_and_autocast():
    w = torch.randn(4, 3, dtype=torch.float64)
    w[1] = 0.0  # |w| below the clamp: its norm term contributes no gradient (the clamp's gradient is zero)
    f = torch.randn(2, 3, dtype=torch.float64)
    wa = w.clone().requires_grad_()
    cosine_similarity(f, wa).sum().backward()
    expected = 1e12 * F.normalize(f, dim=1).sum(0)  # inv = 1 / 1e-12 times sum_b u_b, nothing else
    torch.testing.assert_close(wa.grad[1], expected, rtol=1e-12, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fb, wb = torch.randn(2, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        out = cosine_similarity(fb, wb)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert fb.grad.dtype == wb.grad.dtype == torch.float32
