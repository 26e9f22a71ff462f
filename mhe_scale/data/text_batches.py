"""Tokenised, padded batches of the raw-text XMC splits read by xmc_text.py.

`tokenize` caches its output under a key of (split fingerprint, tokenizer, max_length), so a
second load reads it from disk; on a streamed split (`split_rows(..., streaming=True)`) it works
lazily and `iter_text_batches` collates. Batches are padded to their longest member: input_ids
with the tokenizer's pad id, labels with -1 (the [B, L] layout of mhe_scale.labels.targets), in one
vectorised scatter per column.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mhe_scale.data.xmc_text import file_stamps
from mhe_scale.labels.codec import PAD

_CACHE_VERSION = "xmc_text-1"  # bump when the row layout or tokenisation changes


# ------------------------------------------------------------------ tokenisation
def _tokenize_batch(batch: dict, tokenizer: Any, max_length: int) -> dict:
    enc = tokenizer(batch["text"], truncation=True, max_length=max_length, return_attention_mask=False,
                    return_token_type_ids=False)
    return {"input_ids": enc["input_ids"]}


def tokenizer_key(tokenizer: Any) -> str:
    """Identity of a tokenizer for cache keys: class, name_or_path, vocabulary size, files' stamps."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    files = sorted(p for p in folder.glob("*") if p.is_file() and ("vocab" in p.name or "token" in p.name
                                                                       or p.suffix in (".model", ".txt")))
    return json.dumps([type(tokenizer).__name__, str(folder), len(tokenizer), file_stamps(files) if folder.is_dir() else []])


def tokenize(ds: Any, tokenizer: Any, max_length: int, num_proc: int = 1, cache_dir: str | None = None) -> Any:
    """(text, labels) -> (labels, input_ids) truncated to max_length tokens, [CLS]/[SEP] included.

    A Dataset is tokenised by batched `map` into a cache file keyed by its fingerprint, the
    tokenizer and max_length (reused on the next call); an IterableDataset lazily, uncached.
    """
    import datasets

    if max_length < 2:
        raise ValueError(f"data.max_length={max_length} leaves no room for text between [CLS] and [SEP]; use >= 8")
    kwargs = dict(batched=True, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length}, remove_columns=["text"])
    if isinstance(ds, datasets.IterableDataset):
        return ds.map(_tokenize_batch, **kwargs)
    key = hashlib.sha1(json.dumps([_CACHE_VERSION, ds._fingerprint, tokenizer_key(tokenizer), max_length]).encode())
    folder = cache_dir or (os.path.dirname(ds.cache_files[0]["filename"]) if ds.cache_files else None)
    file = None if folder is None else os.path.join(folder, f"tokenized-{key.hexdigest()[:20]}.arrow")
    return ds.map(_tokenize_batch, num_proc=num_proc if num_proc > 1 else None, cache_file_name=file,
                  new_fingerprint=key.hexdigest()[:16], desc="tokenize", **kwargs)


# ------------------------------------------------------------------ padding and batches
def pad_ragged(values: Tensor, lengths: Tensor, pad: int) -> Tensor:
    """Concatenated rows values [sum(lengths)] -> [B, max(1, max length)] padded at the end with `pad`."""
    b = lengths.numel()
    out = torch.full((b, max(1, int(lengths.max()) if b else 1)), pad, dtype=values.dtype)
    if values.numel():
        rows = torch.repeat_interleave(torch.arange(b), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        out[rows, torch.arange(values.numel()) - starts[rows]] = values
    return out


def _arrow_ragged(column: Any) -> tuple[Tensor, Tensor]:
    """pyarrow list column -> (flat values int64, lengths int64), without Python per-row work."""
    import pyarrow.compute as pc

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    values = torch.from_numpy(pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64))
    lengths = torch.from_numpy(pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64))
    return values, lengths


def make_batch(ids: tuple[Tensor, Tensor], labels: tuple[Tensor, Tensor],
               pad_token_id: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """(flat ids, lengths) x2 -> ({input_ids [B, T], attention_mask [B, T]}, targets [B, L] padded with -1)."""
    input_ids = pad_ragged(ids[0], ids[1], pad_token_id)
    mask = (torch.arange(input_ids.shape[1]) < ids[1].unsqueeze(1)).long()
    return {"input_ids": input_ids, "attention_mask": mask}, pad_ragged(labels[0], labels[1], PAD)


def collate_text(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0) -> tuple[dict[str, Tensor], Tensor]:
    """Rows {input_ids: [...], labels: [...]} -> ({input_ids, attention_mask} [B, T], targets [B, L] (-1 pads))."""
    def ragged(key: str) -> tuple[Tensor, Tensor]:
        lists = [r[key] for r in rows]
        lengths = torch.tensor([len(x) for x in lists], dtype=torch.long)
        return torch.tensor([v for x in lists for v in x], dtype=torch.long), lengths

    return make_batch(ragged("input_ids"), ragged("labels"), pad_token_id)


def iter_text_batches(stream: Any, batch_size: int, pad_token_id: int = 0) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Collated batches from a tokenised IterableDataset (stream mode; the last batch may be short)."""
    rows: list[Mapping] = []
    for row in stream:
        rows.append(row)
        if len(rows) == batch_size:
            yield collate_text(rows, pad_token_id)
            rows = []
    if rows:
        yield collate_text(rows, pad_token_id)


class TokenizedTextDataset(Dataset):
    """(inputs {input_ids [T], attention_mask [T]}, labels [L]) per point of a tokenised HF dataset.

    `__getitems__` (called by torch's DataLoader with a whole batch) fetches the rows as one Arrow
    table and pads them together to the batch's longest text and label list, so the DataLoader's
    default collate only stacks equal-shaped rows. `__getitem__` (one point) pads to the split's
    longest text and label list, so a default_collate of single points works too (at the cost of
    padding short batches to T = the longest text of the split).
    """

    def __init__(self, hf: Any, pad_token_id: int = 0) -> None:
        import pyarrow.compute as pc

        missing = {"input_ids", "labels"} - set(hf.column_names)
        if missing:
            raise ValueError(f"the dataset lacks columns {sorted(missing)}; pass the output of tokenize()")
        self.hf = hf.with_format("arrow")
        self.pad_token_id = int(pad_token_id)
        table = self.hf[:]
        widths = [pc.max(pc.list_value_length(table[c])).as_py() if len(table) else 0 for c in ("input_ids", "labels")]
        self.max_tokens, self.max_labels = (max(1, int(w or 0)) for w in widths)

    def __len__(self) -> int:
        return len(self.hf)

    def batch(self, indices: Sequence[int]) -> tuple[dict[str, Tensor], Tensor]:
        """Padded (inputs, targets) of the points `indices`."""
        table = self.hf[[int(i) for i in indices]]
        return make_batch(_arrow_ragged(table["input_ids"]), _arrow_ragged(table["labels"]), self.pad_token_id)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[dict[str, Tensor], Tensor]]:
        inputs, targets = self.batch(indices)
        return [({"input_ids": a, "attention_mask": m}, y)
                for a, m, y in zip(inputs["input_ids"].unbind(0), inputs["attention_mask"].unbind(0), targets.unbind(0))]

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        inputs, targets = self.batch([i])
        t, l = inputs["input_ids"].shape[1], targets.shape[1]
        ids = torch.nn.functional.pad(inputs["input_ids"][0], (0, self.max_tokens - t), value=self.pad_token_id)
        mask = torch.nn.functional.pad(inputs["attention_mask"][0], (0, self.max_tokens - t))
        return {"input_ids": ids, "attention_mask": mask}, torch.nn.functional.pad(targets[0], (0, self.max_labels - l),
                                                                                   value=PAD)

    def flat_labels(self) -> tuple[Tensor, Tensor]:
        """All label ids (flat [nnz]) and the number per point [N], read column-wise."""
        return _arrow_ragged(self.hf[:]["labels"])

    def label_batches(self, batch_size: int = 8192) -> Iterator[Tensor]:
        """Targets [b, L] padded with -1, chunk by chunk (never the whole [N, L_max] at once)."""
        for start in range(0, len(self), batch_size):
            yield pad_ragged(*_arrow_ragged(self.hf[start:start + batch_size]["labels"]), PAD)
