"""Criteria (ce, bce, asl, aam): values and gradients against naive per-element float64 loops written
from the papers' formulas, ignored targets, reductions, untouched inputs, and the registry."""

import math

import pytest
import torch

from mhe_scale.losses import build_loss, register_loss
from mhe_scale.losses import list_losses as _all_losses

EMBEDDING_LOSSES = {"margin"}  # (embeddings, instance ids) criteria: tests/test_multigrain_margin.py


def list_losses() -> list[str]:
    """The logit criteria (logits [B, C], class targets) these tests cover."""
    return [n for n in _all_losses() if n not in EMBEDDING_LOSSES]

B, C = 5, 4


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-z))


def naive_ce(x, t, label_smoothing=0.0, ignore_index=-1, reduction="mean"):
    total, kept = x.new_zeros(()), 0
    for i in range(x.shape[0]):
        if int(t[i]) == ignore_index:
            continue
        log_z = torch.log(sum(torch.exp(x[i, j]) for j in range(x.shape[1])))
        for j in range(x.shape[1]):
            q = (1 - label_smoothing) * (j == int(t[i])) + label_smoothing / x.shape[1]
            total = total - q * (x[i, j] - log_z)
        kept += 1
    return total / max(kept, 1) if reduction == "mean" else total


def naive_multilabel(element):
    """Sum (or mean) of element(x_ij, positive) over entries with t_ij >= 0."""
    def loss(x, t, reduction, **kw):
        total, kept = x.new_zeros(()), 0
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                if t[i, j] >= 0:
                    total, kept = total + element(x[i, j], bool(t[i, j] == 1), **kw), kept + 1
        return total / max(kept, 1) if reduction == "mean" else total
    return loss


def bce_element(x, positive):
    p = sigmoid(x)
    return -torch.log(p) if positive else -torch.log(1 - p)


def asl_element(x, positive, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8):
    p = sigmoid(x)
    if positive:
        return -(1 - p) ** gamma_pos * torch.log(torch.clamp(p, min=eps))
    p_m = torch.clamp(p - clip, min=0.0)
    return -p_m ** gamma_neg * torch.log(torch.clamp(1 - p_m, min=eps))


def aam_element(c, positive, s=23.0, m=0.0, k=0.7, gamma_pos=0.0, gamma_neg=0.0):
    if positive:
        p = sigmoid(s * (c - m))
        return -(k / s) * (1 - p) ** gamma_pos * torch.log(p)
    p = sigmoid(-s * (c + m))
    return -((1 - k) / s) * (1 - p) ** gamma_neg * torch.log(p)


REFERENCES = {"ce": naive_ce, "bce": naive_multilabel(bce_element), "asl": naive_multilabel(asl_element),
              "aam": naive_multilabel(aam_element)}
# contrastive criteria take (q, k, queue, queue_labels): their naive loop is in test_longtail_kcl.py
CONTRASTIVE = {"kcl", "infonce"}
LOSSES = [n for n in list_losses() if n not in CONTRASTIVE]
CASES = {
    "ce": [{}, {"label_smoothing": 0.1, "reduction": "sum"}],
    "bce": [{"reduction": "mean"}, {"reduction": "sum"}],
    "asl": [{"reduction": "sum"}, {"gamma_pos": 1.0, "gamma_neg": 2.0, "clip": 0.2, "reduction": "mean"},
            {"gamma_pos": 0.5, "gamma_neg": 0.0, "clip": 0.0, "reduction": "sum"}],
    "aam": [{"reduction": "sum"}, {"s": 17.0, "m": 0.1, "k": 0.6, "gamma_pos": 1.0, "gamma_neg": 2.0,
                                   "reduction": "mean"}],
}


def example(name: str, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, C] and targets with ignored entries ([B] for ce, [B, C] in {-1, 0, 1} else)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=gen, dtype=torch.float64) * 2
    if name == "aam":
        x = torch.tanh(x)  # cosines
    if name == "ce":
        t = torch.randint(0, C, (B,), generator=gen)
        t[1] = -1
    else:
        t = torch.randint(0, 2, (B, C), generator=gen)
        t[0, 1], t[3, :2] = -1, -1
    return x.to(dtype), t


@pytest.mark.parametrize("name,kwargs", [(n, kw) for n in CASES for kw in CASES[n]])
def test_value_and_gradient_match_naive_loop(name, kwargs):
    x, t = example(name)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, metrics = build_loss(name, **kwargs)(ours, t)
    expected = REFERENCES[name](ref, t, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.backward(), expected.backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-12)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_targets_get_no_value_and_no_gradient(name):
    x, t = example(name)
    x.requires_grad_()
    build_loss(name)(x, t)[0].backward()
    ignored = (t < 0) if name != "ce" else (t < 0)[:, None].expand(B, C)
    assert ignored.any() and torch.all(x.grad[ignored] == 0) and torch.all(x.grad[~ignored].abs().sum() > 0)
    empty = torch.full_like(t, -1)
    for reduction in ("mean", "sum"):
        y = x.detach().clone().requires_grad_()
        loss, _ = build_loss(name, reduction=reduction)(y, empty)
        loss.backward()
        assert loss.item() == 0 and torch.all(y.grad == 0)


@pytest.mark.parametrize("name", LOSSES)
def test_mean_is_sum_over_kept_entries(name):
    x, t = example(name, seed=1)
    kept = int((t >= 0).sum())
    total, _ = build_loss(name, reduction="sum")(x, t)
    mean, _ = build_loss(name, reduction="mean")(x, t)
    torch.testing.assert_close(mean * kept, total)
    with pytest.raises(ValueError, match="reduction='none' must be one of"):
        build_loss(name, reduction="none")


@pytest.mark.parametrize("name", LOSSES)
def test_inputs_unchanged_and_half_precision_computed_in_fp32(name):
    x, t = example(name, seed=2)
    x32 = x.float().requires_grad_()
    x_before, t_before = x32.detach().clone(), t.clone()
    loss, _ = build_loss(name)(x32, t)
    loss.backward()
    assert torch.equal(x32.detach(), x_before) and torch.equal(t, t_before)
    low, _ = build_loss(name)(x.bfloat16(), t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss.detach(), rtol=0.05, atol=0.02)


def test_known_answers():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    _, metrics = build_loss("ce")(logits, torch.tensor([0, 2, 2, -1]))
    assert metrics["accuracy"].item() == pytest.approx(2 / 3)  # the ignored row counts neither way
    _, metrics = build_loss("ce", ignore_index=0)(logits, torch.tensor([0, 1, 2, 1]))
    assert metrics["accuracy"].item() == pytest.approx(2 / 3)  # row 0 (argmax 0) is ignored, not a hit
    ml_targets = torch.tensor([[1, 0, 0], [1, 0, 1], [0, -1, 1], [-1, 1, 0]])
    _, metrics = build_loss("bce")(logits, ml_targets)
    assert metrics["precision_at_1"].item() == pytest.approx(2 / 4)
    x, t = example("asl", seed=3)  # ASL with no focusing and no clip is summed BCE
    torch.testing.assert_close(build_loss("asl", gamma_neg=0.0, clip=0.0)(x, t)[0],
                               build_loss("bce", reduction="sum")(x, t)[0])
    # a negative with p <= clip costs nothing
    assert build_loss("asl", clip=0.2)(torch.tensor([[math.log(0.1 / 0.9)]]), torch.tensor([[0]]))[0].item() == 0
    c, t = example("aam", seed=3)  # AAM with s=1, m=0, k=1/2 is half the summed BCE on cosines
    half_bce = build_loss("bce", reduction="sum")(c, t)[0] / 2
    torch.testing.assert_close(build_loss("aam", s=1.0, k=0.5)(c, t)[0], half_bce)


@pytest.mark.parametrize("name", LOSSES)
def test_registry_builds_every_loss_and_checks_arguments(name):
    assert name in REFERENCES  # every registered criterion has a naive reference above
    criterion = build_loss(name)
    loss, metrics = criterion(*example(name))
    assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(metrics, dict)
    with pytest.raises(ValueError, match=f"loss '{name}' does not take \\['bogus'\\]"):
        build_loss(name, bogus=1)


def test_registry_errors():
    with pytest.raises(ValueError, match="not registered; choose one of"):
        build_loss("focal")
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("ce")(object)
