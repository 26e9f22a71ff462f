"""Training samplers: the cut into steps / ranks / micro-batches, exact resume, determinism, and
each sampler's promise (coverage, class balance, repeated augmentation, m per class)."""

from collections import Counter

import numpy as np
import pytest
import torch

from mhe_scale.data.samplers import (EpochBatchSampler, MPerClassSampler, RepeatedAugSampler, build_sampler,
                                     epoch_permutation, list_samplers)

OPTIONS = {"repeated_aug": {"num_repeats": 2}, "m_per_class": {"m": 3}}


def labels_of(n: int = 90, classes: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed)) * 7 + 3  # sparse ids


def ranks_of(name: str, labels: torch.Tensor, b: int, k: int, p: int, seed: int = 5, **kw) -> list:
    return [build_sampler(name, labels, micro_batch=b, grad_accum_steps=k, num_processes=p, rank=r, seed=seed,
                          **(OPTIONS.get(name, {}) | kw)) for r in range(p)]


def global_batches(ranks: list, k: int) -> list[list[list[int]]]:
    """[step][rank] -> that rank's indices of the step (its k micro-batches concatenated)."""
    per_rank = [list(s) for s in ranks]
    steps = len(per_rank[0]) // k
    return [[sum(per_rank[r][j * k:(j + 1) * k], []) for r in range(len(ranks))] for j in range(steps)]


def test_epoch_sampler_visits_every_index_once_per_epoch():
    for epoch in range(3):
        ranks = ranks_of("epoch", labels_of(96), b=4, k=2, p=3)
        for s in ranks:
            s.set_position(epoch, 0)
        seen = [i for s in ranks for batch in s for i in batch]
        assert sorted(seen) == list(range(96))


@pytest.mark.parametrize("name", list_samplers())
@pytest.mark.parametrize("b,k,p", [(6, 1, 1), (3, 2, 2), (2, 1, 3)])
def test_ranks_cut_the_global_batch_disjointly(name, b, k, p):
    labels = labels_of()
    ranks = ranks_of(name, labels, b, k, p)
    order = ranks[0].epoch_order(0).tolist()
    g = b * k * p
    assert len(order) == (90 // g) * g and all(len(batch) == b for s in ranks for batch in s)
    for j, per_rank in enumerate(global_batches(ranks, k)):
        # naive reference of the cut: micro-step m of rank r reads offset (m*P + r)*b of step j's batch
        for r in range(p):
            assert per_rank[r] == [order[j * g + (m * p + r) * b + i] for m in range(k) for i in range(b)]
        union = sorted(i for idx in per_rank for i in idx)
        assert union == sorted(order[j * g:(j + 1) * g])  # the ranks' shares: the whole global batch, once


@pytest.mark.parametrize("name", list_samplers())
def test_resume_and_determinism(name):
    labels = labels_of()
    a, b = ranks_of(name, labels, 3, 2, 2)[1], ranks_of(name, labels, 3, 2, 2)[1]
    for epoch in (0, 4):
        a.set_position(epoch, 0)
        full = list(a)
        for start in range(a.steps_per_epoch):
            b.set_position(epoch, start)  # a fresh instance, resumed mid-epoch
            assert len(b) == len(full) - 2 * start and list(b) == full[2 * start:]
    assert not torch.equal(a.epoch_order(0), a.epoch_order(1))
    assert not torch.equal(a.epoch_order(0), ranks_of(name, labels, 3, 2, 2, seed=6)[1].epoch_order(0))


def test_class_balanced_draws_classes_uniformly_on_a_100_to_1_set():
    labels = np.array([40] * 2000 + [7] * 200 + [900] * 20)  # 100:1
    [sampler] = ranks_of("class_balanced", labels, b=37, k=1, p=1)
    drawn = torch.cat([sampler.epoch_order(e) for e in range(5)])  # 5 x 2220 draws
    freq = {c: float((torch.as_tensor(labels)[drawn] == c).double().mean()) for c in (40, 7, 900)}
    assert all(abs(f - 1 / 3) < 0.02 for f in freq.values()), freq
    rare = Counter(i for i in drawn.tolist() if labels[i] == 900)
    assert len(rare) == 20 and max(rare.values()) < 2 * min(rare.values())  # each member ~185 times


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_repeated_aug_each_image_n_times_per_batch_copies_on_distinct_ranks(p):
    b, k, n = 6, 2, 3
    ranks = [RepeatedAugSampler(200, b, k, p, 2, r, seed=1, num_repeats=n) for r in range(p)]
    epoch_images = []
    for per_rank in global_batches(ranks, k):
        counts = Counter(i for idx in per_rank for i in idx)
        assert len(counts) == b * k * p // n and set(counts.values()) == {n}
        for image in counts:
            on_rank = [sum(i == image for i in idx) for idx in per_rank]
            assert max(on_rank) == -(-n // p)  # P >= N: one copy per rank; else spread evenly
        epoch_images += list(counts)
    assert len(set(epoch_images)) == len(epoch_images)  # an image never comes back in the same epoch


def test_m_per_class_exactly_m_per_class_per_batch():
    labels = torch.cat([labels_of(88, classes=11), torch.tensor([500, 500])])  # class 500 has 2 < m samples
    m, b, k, p = 4, 4, 2, 2
    ranks = [MPerClassSampler(labels, b, k, p, 12, r, seed=3, m=m) for r in range(p)]
    visited, used = Counter(), Counter()
    for per_rank in global_batches(ranks, k):
        batch = [i for idx in per_rank for i in idx]
        per_class = Counter(int(labels[i]) for i in batch)
        assert len(per_class) == b * k * p // m and set(per_class.values()) == {m}
        for c in per_class:
            members = [i for i in batch if labels[i] == c]
            assert len(set(members)) == min(m, int((labels == c).sum()))  # repeats only where needed
        visited.update(per_class)
        used.update(batch)
    for c in visited:  # a class's samples take turns: each used floor or ceil(visits * m / size) times
        uses = [used[i] for i in range(len(labels)) if labels[i] == c]
        assert max(uses) - min(uses) <= 1, (c, uses)
    assert len(visited) == 12 and max(visited.values()) - min(visited.values()) <= 1  # 12 classes, 48 slots


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of num_repeats=3"):
        RepeatedAugSampler(100, 4, 1, 2, 1, 0, seed=0)
    with pytest.raises(ValueError, match="multiple of m=3"):
        MPerClassSampler(labels_of(), 4, 1, 1, 1, 0, seed=0, m=3)
    with pytest.raises(ValueError, match="needs 8 classes"):
        MPerClassSampler(labels_of(classes=5), 8, 1, 2, 1, 0, seed=0, m=2)
    with pytest.raises(ValueError, match=r"labels\[2\]=-1 < 0"):
        build_sampler("class_balanced", [0, 1, -1, 1], micro_batch=2, grad_accum_steps=1, num_processes=1,
                      rank=0, seed=0)
    with pytest.raises(ValueError, match="needs the dataset's labels"):
        build_sampler("m_per_class", None, num_samples=10, micro_batch=2, grad_accum_steps=1, num_processes=1,
                      rank=0, seed=0)
    with pytest.raises(ValueError, match="not registered"):
        build_sampler("uniform", None, micro_batch=2, grad_accum_steps=1, num_processes=1, rank=0, seed=0)
    with pytest.raises(ValueError, match="at most 2 steps"):
        EpochBatchSampler(50, 4, 2, 3, 3, 0, seed=0)
    assert torch.equal(epoch_permutation(10, 1, 2), epoch_permutation(10, 1, 2))
