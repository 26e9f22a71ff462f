"""KCL against a naive per-anchor loop: k = 0 is InfoNCE (MoCo), k = None all same-class entries,
exactly min(k, available) positives drawn (seeded), and the keep / zero / mask variants."""

import math

import pytest
import torch
import torch.nn.functional as F

from mhe_scale.losses import build_loss
from mhe_scale.losses.kcl import select_positives


def batch(b=6, k=20, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    key = F.normalize(torch.randn(b, d, generator=g), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    qlab = torch.randint(0, classes, (k,), generator=g)
    qlab[-3:] = -1  # empty slots
    return q, key, queue, qlab, torch.randint(0, classes, (b,), generator=g)


def naive(q, key, queue, qlab, labels, chosen, t, unselected):
    """Per anchor, per entry: the soft-target cross-entropy written out with Python loops."""
    total = 0.0
    for i in range(len(q)):
        terms, pos = [(q[i] @ key[i]) / t], [0]
        for j in range(len(queue)):
            if qlab[j] < 0:
                continue
            s = (q[i] @ queue[j]) / t
            if labels[i] == qlab[j] and not chosen[i, j]:
                if unselected == "mask":
                    continue
                if unselected == "zero":
                    s = s * 0.0
            if chosen[i, j]:
                pos.append(len(terms))
            terms.append(s)
        logz = torch.logsumexp(torch.stack(terms), 0)
        total = total + sum(logz - terms[p] for p in pos) / len(pos)
    return total / len(q)


@pytest.mark.parametrize("k", [0, 1, 2, 5, None])
@pytest.mark.parametrize("unselected", ["keep", "zero", "mask"])
def test_kcl_equals_the_naive_loop(k, unselected):
    q, key, queue, qlab, labels = batch()
    crit = build_loss("kcl", k_positives=k, temperature=0.2, unselected=unselected)
    crit.generator = torch.Generator().manual_seed(5)
    loss, metrics = crit((q, key, queue, qlab), labels)
    chosen = select_positives(labels, qlab, k, torch.Generator().manual_seed(5))
    ref = naive(q, key, queue, qlab, labels, chosen, 0.2, unselected)
    torch.testing.assert_close(loss, ref)
    g1, = torch.autograd.grad(loss, q)
    g2, = torch.autograd.grad(ref, q)
    torch.testing.assert_close(g1, g2)
    assert metrics["chance"].item() == pytest.approx(math.log(21))


def test_k0_is_moco_infonce():
    q, key, queue, _, labels = batch()
    full = torch.zeros(len(queue), dtype=torch.long)
    loss, _ = build_loss("infonce", temperature=0.07)((q, key, queue, full), labels)
    logits = torch.cat([(q * key).sum(1, keepdim=True), q @ queue.t()], 1) / 0.07
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long)))


def test_exactly_k_positives_drawn_uniformly_and_seeded():
    labels = torch.tensor([0, 1, 2])
    qlab = torch.tensor([0] * 10 + [1] * 2 + [-1] * 4)
    chosen = select_positives(labels, qlab, 3, torch.Generator().manual_seed(0))
    assert chosen.sum(1).tolist() == [3, 2, 0]  # min(k, available)
    assert not (chosen & (labels.view(-1, 1) != qlab.view(1, -1))).any()
    again = select_positives(labels, qlab, 3, torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)
    g = torch.Generator().manual_seed(1)
    hits = sum(select_positives(labels[:1], qlab, 3, g).float() for _ in range(2000))[0, :10] / 2000
    assert ((hits - 0.3).abs() < 0.05).all()  # each of the 10 same-class entries with probability 3/10
    assert torch.equal(select_positives(labels, qlab, None), (labels.view(-1, 1) == qlab.view(1, -1)))
