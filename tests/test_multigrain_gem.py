"""GeM pooling against the naive formula (mean over positions of max(x, eps)^p, then the 1/p root)."""

import pytest
import torch

from mhe_scale.models.gem import GeM, GeMBackbone, find_gem, gem
from mhe_scale.models.resnet import resnet


def naive_gem(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.empty(b, c, dtype=torch.float64)
    for i in range(b):
        for j in range(c):
            total = 0.0
            for y in range(h):
                for z in range(w):
                    total += max(float(x[i, j, y, z]), eps) ** p
            out[i, j] = (total / (h * w)) ** (1.0 / p)
    return out


@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
@pytest.mark.parametrize("learn", [False, True])
def test_gem_matches_naive_formula(p, learn):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # negatives exercise the eps clamp
    pool = GeM(p, learn_p=learn, eps=1e-3).double()
    torch.testing.assert_close(pool(x), naive_gem(x, p, 1e-3))


def test_p_is_a_buffer_or_a_parameter_and_learned_p_gets_a_gradient():
    fixed, learned = GeM(3.0), GeM(3.0, learn_p=True)
    assert [n for n, _ in fixed.named_parameters()] == [] and "p" in dict(fixed.named_buffers())
    assert [n for n, _ in learned.named_parameters()] == ["p"]
    learned(torch.rand(2, 3, 4, 4) + 0.1).sum().backward()
    assert learned.p.grad is not None and torch.isfinite(learned.p.grad) and learned.p.grad != 0
    fixed.set_p(4.0)
    assert float(fixed.p) == 4.0 and "p" in fixed.state_dict()


def test_p_one_is_average_pooling_and_p_large_tends_to_max():
    x = torch.rand(2, 3, 5, 5) + 0.01
    torch.testing.assert_close(GeM(1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(gem(x.double(), 200.0), x.double().amax(dim=(2, 3)), rtol=2e-2, atol=0)


def test_half_inputs_are_pooled_in_fp32():
    x = torch.rand(2, 3, 4, 4).bfloat16()
    assert GeM(3.0)(x).dtype == torch.float32


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="p must be >= 1"):
        GeM(0.5)
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        GeM()(torch.rand(2, 3))


def test_resnet_pools_with_gem_at_any_input_size():
    torch.manual_seed(0)
    net = resnet(18, stem="cifar", width=4, pool=GeM(3.0)).eval()
    assert find_gem(net).p == 3.0
    with torch.no_grad():
        for size in [(32, 32), (40, 24), (17, 53)]:
            x = torch.randn(2, 3, *size)
            out = net.forward_features(x)
            assert out.shape == (2, net.num_features)
            torch.testing.assert_close(out, gem(net.forward_feature_map(x), 3.0))
    wrapped = GeMBackbone(resnet(18, stem="cifar", width=4), GeM(2.0)).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 21, 35)
        torch.testing.assert_close(wrapped(x), gem(wrapped.forward_feature_map(x), 2.0))
