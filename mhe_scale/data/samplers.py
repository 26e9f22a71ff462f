"""Training samplers by name: 'epoch', 'class_balanced', 'repeated_aug', 'm_per_class'.

    sampler = build_sampler("repeated_aug", labels, micro_batch=64, grad_accum_steps=1,
                            num_processes=world, rank=rank, seed=cfg.seed, num_repeats=3)
    loader = DataLoader(dataset, batch_sampler=sampler); sampler.set_position(epoch, start_step)

Each is an IndexBatchSampler (epoch_sampler.py): one index order per (seed, epoch) cut into global
batches, ranks and micro-batches the same way, so resume and rank-disjointness hold for all.
labels: 1-D ints [N], one class id >= 0 per sample (class ids need not be contiguous).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from mhe_scale.data.epoch_sampler import (EpochBatchSampler, IndexBatchSampler, epoch_generator,
                                          epoch_permutation)

__all__ = ["EpochBatchSampler", "IndexBatchSampler", "epoch_permutation", "ClassBalancedSampler",
           "RepeatedAugSampler", "MPerClassSampler", "register_sampler", "list_samplers", "build_sampler"]


class _ByClass:
    """Labels [N] grouped by class: members [N] (indices, class by class), counts [C], offsets [C]."""

    def __init__(self, labels: Tensor | np.ndarray, who: str) -> None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
            raise ValueError(f"{who}: labels must be a non-empty 1-D integer array [N], got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long()
        if bool((labels < 0).any()):
            bad = int(torch.nonzero(labels < 0)[0])
            raise ValueError(f"{who}: labels[{bad}]={int(labels[bad])} < 0; class-aware samplers need a class "
                             f"per sample (drop unlabelled samples from the training set)")
        self.labels = labels
        self.members = torch.argsort(labels, stable=True)
        _, self.counts = torch.unique_consecutive(labels[self.members], return_counts=True)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts


class ClassBalancedSampler(IndexBatchSampler):
    """cRT re-training: every draw picks a class uniformly, then one of its samples uniformly
    (with replacement); an epoch is steps_per_epoch * G draws seeded by (seed, epoch)."""

    def __init__(self, labels: Tensor | np.ndarray, micro_batch: int, grad_accum_steps: int, num_processes: int,
                 steps_per_epoch: int, rank: int, seed: int) -> None:
        super().__init__(len(labels), micro_batch, grad_accum_steps, num_processes, steps_per_epoch, rank, seed)
        self.by_class = _ByClass(labels, "class_balanced sampler")

    def epoch_order(self, epoch: int) -> Tensor:
        g, n, bc = epoch_generator(self.seed, epoch), self.steps_per_epoch * self.global_batch, self.by_class
        cls = torch.randint(len(bc.counts), (n,), generator=g)
        within = (torch.rand(n, generator=g, dtype=torch.float64) * bc.counts[cls]).long()
        return bc.members[bc.offsets[cls] + torch.minimum(within, bc.counts[cls] - 1)]


class RepeatedAugSampler(IndexBatchSampler):
    """Repeated augmentation (MultiGrain, DeiT): each global batch holds G/N distinct samples, each
    N times. Copy c of a sample goes to rank (u*N + c) mod P, so its N copies sit on N distinct ranks
    when P >= N (batch norm never sees two on one device) and spread evenly when P < N. An epoch
    draws steps_per_epoch * G / N distinct samples, the head of the (seed, epoch) permutation."""

    def __init__(self, num_samples: int, micro_batch: int, grad_accum_steps: int, num_processes: int,
                 steps_per_epoch: int, rank: int, seed: int, num_repeats: int = 3) -> None:
        super().__init__(num_samples, micro_batch, grad_accum_steps, num_processes, steps_per_epoch, rank, seed)
        g = self.global_batch
        if num_repeats < 1 or g % num_repeats:
            raise ValueError(f"repeated_aug sampler: the global batch {g} (micro_batch {micro_batch} x "
                             f"{num_processes} processes x {grad_accum_steps} accumulation steps) must be a "
                             f"multiple of num_repeats={num_repeats}; change the batch size or num_repeats")
        if steps_per_epoch * g // num_repeats > num_samples:
            raise ValueError(f"repeated_aug sampler: {steps_per_epoch} steps x {g // num_repeats} distinct "
                             f"samples > num_samples={num_samples}; lower steps_per_epoch")
        self.num_repeats = num_repeats

    def epoch_order(self, epoch: int) -> Tensor:
        s, g, p, n = self.steps_per_epoch, self.global_batch, self.num_processes, self.num_repeats
        distinct = epoch_permutation(self.num_samples, self.seed, epoch)[: s * g // n].view(s, g // n)
        seq = distinct.repeat_interleave(n, dim=1)  # [S, G]: u0 u0 u0 u1 u1 u1 ...
        # rank r takes seq[:, r::P], i.e. position (m*b + i)*P + r becomes [step, m, r, i]
        return seq.view(s, self.grad_accum_steps, self.micro_batch, p).permute(0, 1, 3, 2).reshape(-1)


class MPerClassSampler(IndexBatchSampler):
    """Metric learning: each global batch holds G/m distinct classes with m samples each, the m
    adjacent in the order. Classes come from (seed, epoch)-seeded class permutations, G/m at a time;
    a class's samples are taken in a per-epoch shuffled order, continuing on each visit, repeated
    cyclically (i.e. with replacement) where a class has fewer than m."""

    def __init__(self, labels: Tensor | np.ndarray, micro_batch: int, grad_accum_steps: int, num_processes: int,
                 steps_per_epoch: int, rank: int, seed: int, m: int = 4) -> None:
        super().__init__(len(labels), micro_batch, grad_accum_steps, num_processes, steps_per_epoch, rank, seed)
        self.by_class, g = _ByClass(labels, "m_per_class sampler"), self.global_batch
        if m < 1 or g % m:
            raise ValueError(f"m_per_class sampler: the global batch {g} must be a multiple of m={m}; "
                             f"change the batch size or m")
        if g // m > len(self.by_class.counts):
            raise ValueError(f"m_per_class sampler: a global batch of {g} needs {g // m} classes of m={m}, but "
                             f"the labels hold {len(self.by_class.counts)} classes; lower the batch or raise m")
        self.m = m

    def epoch_order(self, epoch: int) -> Tensor:
        gen, bc = epoch_generator(self.seed, epoch), self.by_class
        k, steps = self.global_batch // self.m, self.steps_per_epoch
        num_classes = len(bc.counts)
        per_perm = num_classes // k  # batches cut from one class permutation (the rest is dropped)
        perms = [torch.randperm(num_classes, generator=gen)[: per_perm * k] for _ in range(-(-steps // per_perm))]
        cls = torch.cat(perms)[: steps * k]  # [S*k], k distinct classes per step
        shuffled = torch.randperm(len(bc.labels), generator=gen)
        shuffled = shuffled[torch.argsort(bc.labels[shuffled], stable=True)]  # by class, random inside
        # visit = how many times this class came before in the epoch (rank among equal entries)
        order = torch.argsort(cls, stable=True)
        ranked = torch.arange(len(cls)) - torch.searchsorted(cls[order], cls[order])
        visit = torch.empty_like(cls)
        visit[order] = ranked
        within = (visit[:, None] * self.m + torch.arange(self.m)) % bc.counts[cls][:, None]  # [S*k, m]
        return shuffled[bc.offsets[cls][:, None] + within].reshape(-1)


_SAMPLERS: dict[str, tuple[Callable[..., IndexBatchSampler], bool]] = {}


def register_sampler(name: str, needs_labels: bool) -> Callable[[type], type]:
    """Class decorator: build `name` by build_sampler (`needs_labels`: its first argument is labels [N],
    else num_samples)."""
    def add(cls: type) -> type:
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        _SAMPLERS[name] = (cls, needs_labels)
        return cls
    return add


register_sampler("epoch", needs_labels=False)(EpochBatchSampler)
register_sampler("class_balanced", needs_labels=True)(ClassBalancedSampler)
register_sampler("repeated_aug", needs_labels=False)(RepeatedAugSampler)
register_sampler("m_per_class", needs_labels=True)(MPerClassSampler)


def list_samplers() -> list[str]:
    return sorted(_SAMPLERS)


def build_sampler(name: str, labels: Tensor | np.ndarray | None, *, micro_batch: int, grad_accum_steps: int,
                  num_processes: int, rank: int, seed: int, steps_per_epoch: int | None = None,
                  num_samples: int | None = None, **options: int) -> IndexBatchSampler:
    """The sampler `name` over a dataset with labels [N] (None is fine for 'epoch' and 'repeated_aug'
    given num_samples). steps_per_epoch defaults to N // global batch (an epoch = N draws, rounded
    down to whole optimizer steps). options go to the sampler (num_repeats, m)."""
    if name not in _SAMPLERS:
        raise ValueError(f"sampler {name!r} is not registered; choose one of {list_samplers()}")
    cls, needs_labels = _SAMPLERS[name]
    if labels is None and (needs_labels or num_samples is None):
        raise ValueError(f"sampler {name!r} needs the dataset's labels [N]" + ("" if needs_labels else
                                                                               " or num_samples"))
    n = len(labels) if labels is not None else int(num_samples)  # type: ignore[arg-type]
    global_batch = micro_batch * num_processes * grad_accum_steps
    if steps_per_epoch is None:
        steps_per_epoch = n // global_batch
        if steps_per_epoch < 1:
            raise ValueError(f"sampler {name!r}: {n} samples cannot fill one optimizer step of {global_batch} "
                             f"({micro_batch} x {num_processes} processes x {grad_accum_steps} accumulation steps)")
    first = labels if needs_labels else n
    return cls(first, micro_batch, grad_accum_steps, num_processes, steps_per_epoch, rank, seed, **options)
