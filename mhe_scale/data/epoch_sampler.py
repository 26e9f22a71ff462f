"""The cut shared by every training sampler, and the plain epoch sampler (a seeded permutation).

Samplers are distributed-aware, exactly resumable index batches for a map-style dataset.

Every sampler builds one index order per (seed, epoch), `epoch_order(epoch)` [S*G] (S optimizer
steps per epoch, G = micro_batch * num_processes * grad_accum_steps samples per optimizer step),
and cuts it the same way: optimizer step j uses the global batch order[j*G:(j+1)*G]; inside it
micro-step m of process r reads the contiguous slice at offset (m*P + r)*b (b micro batch,
P processes). So the ranks' micro-batches of a step are disjoint and together make its global
batch, and `set_position(epoch, start_step)` resumes exactly where an uninterrupted pass would be.
This file holds that cut and the plain 'epoch' sampler; samplers.py the class-aware ones and
`build_sampler` (import all of them from mhe_scale.data.samplers).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator seeded by (seed, epoch) alone, mixed so that nearby pairs do not collide."""
    mixed = np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The sample order of `epoch`: a permutation [N] depending only on (seed, epoch)."""
    return torch.randperm(num_samples, generator=epoch_generator(seed, epoch))


class IndexBatchSampler(Sampler[list[int]]):
    """Base: this process's micro-batches of one epoch, from optimizer step `start_step` on.

    Subclasses implement `epoch_order(epoch) -> Tensor [steps_per_epoch * global_batch]` (int64
    indices into the dataset), a pure function of (seed, epoch).
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum_steps: int, num_processes: int,
                 steps_per_epoch: int, rank: int, seed: int) -> None:
        for key, value in (("num_samples", num_samples), ("micro_batch", micro_batch),
                           ("grad_accum_steps", grad_accum_steps), ("num_processes", num_processes),
                           ("steps_per_epoch", steps_per_epoch)):
            if value < 1:
                raise ValueError(f"{type(self).__name__}: {key}={value} must be >= 1")
        if not 0 <= rank < num_processes:
            raise ValueError(f"{type(self).__name__}: rank={rank} is not in [0, num_processes={num_processes})")
        self.num_samples, self.micro_batch, self.grad_accum_steps = num_samples, micro_batch, grad_accum_steps
        self.num_processes, self.steps_per_epoch, self.rank, self.seed = num_processes, steps_per_epoch, rank, seed
        self.epoch, self.start_step = 0, 0

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: micro_batch * num_processes * grad_accum_steps."""
        return self.micro_batch * self.num_processes * self.grad_accum_steps

    def epoch_order(self, epoch: int) -> Tensor:
        raise NotImplementedError

    def set_position(self, epoch: int, start_step: int) -> None:
        """The next __iter__ yields `epoch` from optimizer step `start_step` on."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        mine = order.view(self.steps_per_epoch, self.grad_accum_steps, self.num_processes, self.micro_batch)
        yield from mine[self.start_step:, :, self.rank].reshape(-1, self.micro_batch).tolist()


class EpochBatchSampler(IndexBatchSampler):
    """Each epoch visits perm[:S*G] of a seeded permutation once (the last partial batch is dropped)."""

    def __init__(self, num_samples: int, micro_batch: int, grad_accum_steps: int, num_processes: int,
                 steps_per_epoch: int, rank: int, seed: int) -> None:
        super().__init__(num_samples, micro_batch, grad_accum_steps, num_processes, steps_per_epoch, rank, seed)
        if steps_per_epoch * self.global_batch > num_samples:
            raise ValueError(f"EpochBatchSampler: steps_per_epoch={steps_per_epoch} x global batch "
                             f"{self.global_batch} > num_samples={num_samples}; at most "
                             f"{num_samples // self.global_batch} steps fit in one pass")

    def epoch_order(self, epoch: int) -> Tensor:
        return epoch_permutation(self.num_samples, self.seed, epoch)[: self.steps_per_epoch * self.global_batch]
