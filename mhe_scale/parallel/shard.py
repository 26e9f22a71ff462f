"""Which contiguous range of items (classes, groups) each rank owns.

A head with N items sharded over W ranks gives rank r the range [start, start + count):
contiguous, in rank order, balanced to within one item (the first N % W ranks hold one more).
All class-range arithmetic in the project goes through `shard_range`; `ShardPlan` carries the
result together with id <-> local-column conversions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from mhe_scale.parallel.collectives import get_rank, get_world_size


def shard_range(num_items: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of the items rank `rank` of `world` owns; every rank gets at least one.

    Example: 11 items over 3 ranks -> (0, 4), (4, 4), (8, 3).
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got world={world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}) for world={world}, got rank={rank}")
    if num_items < world:
        raise ValueError(
            f"cannot shard num_items={num_items} over world={world} ranks: every rank needs at least one "
            f"item; use at most {num_items} ranks for this head or a head with more items"
        )
    base, extra = divmod(num_items, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class ShardPlan:
    """This rank's share of `num_items` items: global ids [start, start + count).

    Build with `ShardPlan.for_rank(num_items, rank, world)` or `ShardPlan.from_group(num_items, group)`
    (group=None: one process owning everything). Hand-built plans are checked against `shard_range`.
    """

    num_items: int
    world: int
    rank: int
    start: int
    count: int

    def __post_init__(self) -> None:
        expected = shard_range(self.num_items, self.rank, self.world)
        if (self.start, self.count) != expected:
            raise ValueError(
                f"ShardPlan(num_items={self.num_items}, world={self.world}, rank={self.rank}) must have "
                f"(start, count)={expected}, got ({self.start}, {self.count}); build it with ShardPlan.for_rank"
            )

    @classmethod
    def for_rank(cls, num_items: int, rank: int, world: int) -> ShardPlan:
        start, count = shard_range(num_items, rank, world)
        return cls(num_items, world, rank, start, count)

    @classmethod
    def from_group(cls, num_items: int, group: ProcessGroup | None) -> ShardPlan:
        """The plan of this process in `group` (None: world 1, rank 0)."""
        return cls.for_rank(num_items, get_rank(group), get_world_size(group))

    @property
    def end(self) -> int:
        """One past the last owned global id."""
        return self.start + self.count

    def owns(self, ids: Tensor) -> Tensor:
        """ids [...] global ids (any value, e.g. -1 padding) -> BoolTensor [...]: owned by this rank."""
        return (ids >= self.start) & (ids < self.end)

    def to_local(self, ids: Tensor) -> Tensor:
        """ids [...] global ids -> LongTensor [...] local column (id - start), -1 where not owned."""
        ids = ids.long()
        return torch.where(self.owns(ids), ids - self.start, torch.full_like(ids, -1))

    def to_global(self, local: Tensor) -> Tensor:
        """local [...] columns in [0, count) -> global ids (id + start)."""
        return local.long() + self.start

    def all_ranges(self) -> list[tuple[int, int]]:
        """(start, count) of every rank, in rank order."""
        return [shard_range(self.num_items, r, self.world) for r in range(self.world)]

    def local_slice(self) -> slice:
        """slice(start, end): this rank's rows of a full [num_items, ...] tensor."""
        return slice(self.start, self.end)
