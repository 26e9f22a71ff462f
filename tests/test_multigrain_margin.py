"""Margin loss with distance-weighted sampling against naive per-anchor float64 loops written from
Wu et al. 2017 / MultiGrain's formulas (sampling weights, positive pairs, hinge terms, active-term
normalisation), with a fixed generator."""

import math

import pytest
import torch

from mhe_scale.losses import build_loss
from mhe_scale.losses.margin import MarginLoss, negative_weights, pairwise_distances


def naive_distances(x):
    b = x.shape[0]
    e = [x[i] / math.sqrt(float((x[i] * x[i]).sum())) for i in range(b)]
    return [[math.sqrt(max(float(((e[i] - e[j]) ** 2).sum()), 0.0)) for j in range(b)] for i in range(b)]


def naive_probs(x, ids, cutoff=0.5, far=1.4):
    d, n, b = naive_distances(x), x.shape[1], x.shape[0]
    probs = []
    for i in range(b):
        w = []
        for k in range(b):
            if ids[k] == ids[i] or d[i][k] >= far:
                w.append(0.0)
                continue
            dd = max(d[i][k], cutoff)
            w.append(dd ** (2 - n) * (1 - dd * dd / 4) ** (-(n - 3) / 2))
        if sum(w) == 0:
            w = [0.0 if ids[k] == ids[i] else 1.0 for k in range(b)]
        probs.append([v / sum(w) for v in w])
    return torch.tensor(probs, dtype=torch.float64)


def naive_loss(x, beta, ids, anchors, positives, negatives, alpha=0.2):
    """x [B, D] float64 with grad; terms looped one by one."""
    e = [x[i] / torch.sqrt((x[i] * x[i]).sum()) for i in range(x.shape[0])]
    total, active = x.new_zeros(()), 0
    for a, p, n in zip(anchors, positives, negatives):
        assert ids[a] == ids[p] and a != p and ids[a] != ids[n]
        dp, dn = torch.sqrt(((e[a] - e[p]) ** 2).sum()), torch.sqrt(((e[a] - e[n]) ** 2).sum())
        for term in (alpha + dp - beta, alpha - dn + beta):
            if term > 0:
                total, active = total + term, active + 1
    return total / max(active, 1)


def batch(b=12, d=8, repeats=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(b // repeats).repeat_interleave(repeats)
    centres = torch.randn(b // repeats, d, generator=g, dtype=torch.float64)
    return centres[ids] + 0.6 * torch.randn(b, d, generator=g, dtype=torch.float64), ids


@pytest.mark.parametrize("d", [8, 128])
def test_sampling_weights_match_the_inverse_sphere_density(d):
    x, ids = batch(d=d)
    probs = negative_weights(pairwise_distances(x), ids[:, None] == ids[None, :], d)
    torch.testing.assert_close(probs, naive_probs(x, ids), rtol=1e-6, atol=1e-12)
    assert torch.all(probs[ids[:, None] == ids[None, :]] == 0)


def test_rows_without_admissible_negatives_fall_back_to_uniform_over_other_instances():
    x = torch.eye(4, dtype=torch.float64)  # all distances sqrt(2) >= 1.4: nothing admissible
    ids = torch.tensor([0, 0, 1, 1])
    probs = negative_weights(pairwise_distances(x), ids[:, None] == ids[None, :], 4)
    torch.testing.assert_close(probs, naive_probs(x, ids))
    assert torch.allclose(probs[0], torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64))


def test_draws_follow_the_weights_and_positives_are_the_other_copies():
    x, ids = batch(b=9, d=6, seed=1)
    loss = MarginLoss()
    dist = pairwise_distances(x)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(9, 9, dtype=torch.float64)
    for _ in range(300):
        a, p, n = loss.sample(dist, ids, 6, generator=g)
        counts.index_put_((a, n), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    expected_pairs = {(i, j) for i in range(9) for j in range(9) if i != j and ids[i] == ids[j]}
    assert set(zip(a.tolist(), p.tolist())) == expected_pairs and len(a) == len(expected_pairs)
    freq = counts / counts.sum(dim=1, keepdim=True)
    assert (freq - naive_probs(x, ids)).abs().max() < 0.06  # 600 draws per row


@pytest.mark.parametrize("d,seed", [(8, 0), (32, 3)])
def test_loss_and_gradients_match_naive_per_anchor_loop(d, seed):
    x, ids = batch(d=d, seed=seed)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    crit = MarginLoss().double()
    loss, metrics = crit(ours, ids, generator=torch.Generator().manual_seed(7))
    a, p, n = crit.sample(pairwise_distances(x), ids, d, generator=torch.Generator().manual_seed(7))
    beta = crit.beta.detach().clone().requires_grad_()  # 1.2 rounded to fp32, then made fp64
    expected = naive_loss(ref, beta, ids.tolist(), a.tolist(), p.tolist(), n.tolist())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.backward(), expected.backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(crit.beta.grad, beta.grad)
    assert metrics["beta"] == pytest.approx(1.2) and 0 < metrics["active"] <= 1


def test_known_answer_and_registry():
    # two instances, two copies each, in 2-D: copies at 0 and 90 degrees apart
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([5, 5, 9, 9])
    loss, metrics = build_loss("margin", alpha=0.2, beta_init=1.2)(x, ids)
    # every positive term: 0.2 + 0 - 1.2 < 0; every negative at sqrt(2): 0.2 - 1.414 + 1.2 < 0
    assert loss.item() == 0 and metrics["active"].item() == 0
    loss, _ = build_loss("margin", alpha=0.2, beta_init=1.5)(x, ids)  # negatives now active
    assert loss.item() == pytest.approx(0.2 - math.sqrt(2) + 1.5)
    with pytest.raises(ValueError, match="instance ids"):
        MarginLoss()(x, ids[:3])


def test_batch_without_positives_gives_zero_with_gradient_paths():
    x = torch.randn(4, 8, requires_grad=True)
    crit = MarginLoss()
    loss, _ = crit(x, torch.arange(4))
    loss.backward()
    assert loss.item() == 0 and crit.beta.grad is not None and x.grad is not None


def test_beta_has_its_own_parameter_list_and_half_inputs_run_in_fp32():
    crit = MarginLoss()
    assert crit.beta_parameters() == [crit.beta] and [n for n, _ in crit.named_parameters()] == ["beta"]
    x, ids = batch()
    loss, _ = crit(x.bfloat16(), ids, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32


def test_batch_of_one_instance_has_positive_terms_only():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    crit = MarginLoss().double()
    a, p, n = crit.sample(pairwise_distances(x.detach()), torch.zeros(3, dtype=torch.long), 2)
    assert len(a) == 6 and torch.all(n == -1)
    loss, metrics = crit(x, torch.zeros(3, dtype=torch.long))
    d = [math.sqrt(2), math.sqrt(2), 2.0]  # pairs (0,1), (1,2), (0,2), each counted in both directions
    active = [0.2 + v - 1.2 for v in d if 0.2 + v - 1.2 > 0]
    assert loss.item() == pytest.approx(sum(active) * 2 / (2 * len(active)))
    loss.backward()
    assert torch.isfinite(x.grad).all()
