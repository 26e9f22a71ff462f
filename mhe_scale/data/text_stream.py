"""Training on a raw-text XMC corpus read as a stream (`data.streaming=true`): nothing is cached.

The map-style path (xmc_text.load_text_splits + text_batches.tokenize) writes the corpus and its
tokens to memory-mapped Arrow files once and then reads them at random; that needs disk for them
and a full pass before the first step. Streaming reads the text files as training goes: per epoch the
rows pass a shuffle buffer (`datasets.IterableDataset.shuffle`) seeded by (seed, epoch), rank r of
W keeps every W-th row after it (`split_dataset_by_node`), tokenises them lazily and yields full
micro-batches. `engine.fit` drives it as a `BatchStream`: one counting pass up front
(`count_rows_and_labels`) gives the epoch length and the label frequencies for PSP@k.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mhe_scale.data.text_batches import iter_text_batches, tokenize
from mhe_scale.engine.stream import BatchStream


def count_rows_and_labels(rows: Any, progress: bool = True) -> tuple[int, Tensor]:
    """One pass over a stream of {text, labels} rows -> (rows, label frequencies [max id + 1])."""
    counts = torch.zeros(0, dtype=torch.long)
    n = 0
    for row in tqdm(rows, desc="count training rows", unit=" rows", mininterval=2.0, disable=not progress):
        n += 1
        labels = torch.as_tensor(row["labels"], dtype=torch.long)
        if labels.numel():
            top = int(labels.max()) + 1
            if top > counts.numel():
                counts = torch.cat([counts, counts.new_zeros(top - counts.numel())])
            counts += torch.bincount(labels, minlength=counts.numel())
    return n, counts


class TextBatchStream(BatchStream):
    """Micro-batches ({input_ids, attention_mask} [b, T], targets [b, L] padded with -1) of a streamed split.

    Args:
        rows: `split_rows(..., streaming=True)`: a datasets.IterableDataset of {text, labels}.
        num_rows: rows in one pass (count_rows_and_labels).
        tokenizer, max_length: as text_batches.tokenize.
        shuffle_buffer: rows held by the shuffle buffer (<= 1: the file order every epoch).
    """

    def __init__(self, rows: Any, num_rows: int, tokenizer: Any, max_length: int, shuffle_buffer: int = 10_000) -> None:
        super().__init__()
        self.rows, self.num_rows = rows, int(num_rows)
        self.tokenizer, self.max_length, self.shuffle_buffer = tokenizer, int(max_length), int(shuffle_buffer)
        self.pad_token_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return self.num_rows

    def rank_rows(self, epoch: int, rank: int, world: int, seed: int) -> Any:
        """This rank's rows of the epoch, shuffled, before tokenisation."""
        from datasets.distributed import split_dataset_by_node

        rows = self.rows
        if self.shuffle_buffer > 1:  # one seed per (seed, epoch), mixed as data.samplers.epoch_permutation does
            epoch_seed = int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch]).generate_state(1)[0])
            rows = rows.shuffle(seed=epoch_seed, buffer_size=self.shuffle_buffer)
        return split_dataset_by_node(rows, rank=rank, world_size=world) if world > 1 else rows

    def batches(self, epoch: int, rank: int, world: int, micro_batch: int, seed: int) -> Iterator[Any]:
        tokens = tokenize(self.rank_rows(epoch, rank, world, seed), self.tokenizer, self.max_length)
        for inputs, targets in iter_text_batches(tokens, micro_batch, self.pad_token_id):
            if len(targets) == micro_batch:  # the short last batch is dropped, as fit does
                yield inputs, targets
