"""Evaluation batches across processes: each of P processes scores a contiguous 1/P of a test set
in the SAME number of batches (a class-sharded head's predict is collective), with the model in
eval mode, its ZeRO-3 partitions gathered and the EMA/SWA weights applied when given. Tasks sum
their metric states over processes (accelerator.reduce) so every process returns the whole set's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm


def rank_batches(num_samples: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s evaluation batches: its contiguous 1/world of [0, N) cut into the SAME number
    of batches on every rank (sizes differ by at most one; some may be empty)."""
    lo, hi = rank * num_samples // world, (rank + 1) * num_samples // world
    most = -(-num_samples // world)
    count = max(1, -(-most // batch_size))
    return [chunk.tolist() for chunk in torch.arange(lo, hi).tensor_split(count)]


def collate_indices(test_set: Dataset, indices: list[int]) -> Any:
    """One batch of test_set (an empty batch of the right structure when indices is empty)."""
    from torch.utils.data import default_collate

    if indices:
        # one batched fetch where the dataset offers it (as torch's DataLoader does), so datasets
        # that build a batch at once (CSR rows, padded text, DALI decode) are not read per point
        getitems = getattr(test_set, "__getitems__", None)
        return default_collate(getitems(indices) if getitems is not None else [test_set[i] for i in indices])
    from accelerate.utils import recursively_apply

    return recursively_apply(lambda t: t[:0], default_collate([test_set[0]]))


def rank_and_world(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


@contextlib.contextmanager
def evaluating(model: nn.Module, accelerator=None, ema=None) -> Iterator[None]:
    """model in eval mode (restored after), ZeRO-3 partitions gathered, EMA/SWA weights applied."""
    from mhe_scale.engine.accelerator import full_parameters

    was_training = model.training
    model.eval()
    gather = full_parameters(accelerator, model) if accelerator is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), gather, ema.applied() if ema is not None else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def test_batches(model: nn.Module, test_set: Dataset, batch_size: int, accelerator=None,
                 desc: str = "eval") -> Iterator[tuple[Any, Any]]:
    """This process's (inputs, targets) batches on its device, floating inputs cast as the engine
    expects (DeepSpeed bf16). Use inside `evaluating(model, ...)`."""
    from mhe_scale.engine.accelerator import cast_floating, input_dtype

    rank, world = rank_and_world(accelerator)
    cast = input_dtype(accelerator, model) if accelerator is not None else None
    for indices in tqdm(rank_batches(len(test_set), batch_size, rank, world), desc=desc, leave=False,
                        mininterval=1.0, disable=rank != 0):
        inputs, targets = collate_indices(test_set, indices)
        if accelerator is not None:
            from accelerate.utils import send_to_device

            inputs, targets = send_to_device((inputs, targets), accelerator.device)
        yield cast_floating(inputs, cast), targets
