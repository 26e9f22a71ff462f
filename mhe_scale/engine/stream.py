"""Training sets read as a stream of ready micro-batches, for corpora that are not indexed on disk.

`fit` normally draws index batches from a map-style dataset (data/samplers.py). A `BatchStream`
instead produces its own micro-batches for (epoch, rank): `fit` asks for epoch e starting at
optimizer step s, and the stream yields exactly steps_per_epoch x grad_accum_steps micro-batches of
this rank's rows for that epoch, dropping the first s x grad_accum_steps (already trained on before
a resume). Resuming therefore replays the skipped part of the epoch's stream, which costs reading
it again but keeps a resumed run equal to the uninterrupted one, provided `batches` depends only
on its arguments (seeded shuffling, no global RNG).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset


class StreamTooShortError(ValueError):
    """The stream ended before the epoch's planned number of micro-batches."""


class BatchStream(IterableDataset, ABC):
    """Subclasses give the row count (`__len__`, used to plan the epochs) and `batches`."""

    def __init__(self) -> None:
        self._position: dict[str, Any] | None = None

    @abstractmethod
    def __len__(self) -> int:
        """Training rows in one pass over the whole stream (all ranks together)."""

    @abstractmethod
    def batches(self, epoch: int, rank: int, world: int, micro_batch: int, seed: int) -> Iterator[Any]:
        """Rank `rank`'s full micro-batches (inputs, targets) of `micro_batch` rows for this epoch,
        a deterministic function of the arguments; ranks must see disjoint rows."""

    def set_position(self, epoch: int, start_step: int, *, micro_per_epoch: int, grad_accum_steps: int,
                     rank: int, world: int, micro_batch: int, seed: int) -> None:
        """What the next `iter()` yields: epoch `epoch` from optimizer step `start_step` on."""
        self._position = dict(epoch=epoch, skip=start_step * grad_accum_steps, total=micro_per_epoch, rank=rank,
                              world=world, micro_batch=micro_batch, seed=seed)

    def __iter__(self) -> Iterator[Any]:
        if self._position is None:
            raise RuntimeError("BatchStream.set_position must be called before iterating (engine.fit does it)")
        pos = self._position
        source = self.batches(pos["epoch"], pos["rank"], pos["world"], pos["micro_batch"], pos["seed"])
        for i in range(pos["total"]):
            batch = next(source, None)
            if batch is None:
                raise StreamTooShortError(
                    f"{type(self).__name__} ended after {i} micro-batches of {pos['micro_batch']} rows in epoch "
                    f"{pos['epoch']} on rank {pos['rank']} of {pos['world']}, but {len(self):,} rows were declared, "
                    f"planning {pos['total']} per epoch; the declared row count is wrong or the ranks' shares "
                    "are uneven")
            if i >= pos["skip"]:
                yield batch
