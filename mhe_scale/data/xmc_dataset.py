"""A torch Dataset over XC-format data (sparse BoW features + padded label lists).

The features stay a CSR matrix (three flat arrays) and a batch is densified in one vectorised
gather + scatter: `__getitems__` (which torch's DataLoader calls with a whole batch of indices)
builds the dense [B, F] block at once, so no per-row Python runs while the batch is assembled.
Only the DataLoader's default collate then re-stacks the B row views (one copy, in C++).

Feature scaling (`scale_features`, applied once to the stored values, never at batch time):
  "none"   raw values
  "l2"     each row divided by its L2 norm (empty rows stay zero)
  "tfidf"  x_if * idf_f, idf_f = ln((1 + N) / (1 + df_f)) + 1 with document frequencies df_f
           counted on the TRAINING rows (pass the training idf to the test split), then L2 per row

Label order (`cluster_label_order`): MHE heads split a label id into digits, so labels sharing a
prefix (an MHC group) are whatever the ids put together. "cluster" renumbers the labels so that
neighbouring ids have similar training points: each label is represented by the normalised sum of
its training rows, and the labels are ordered by recursive balanced 2-means bisection (spherical,
as in Parabel / LightXML label trees), every level of the tree processed at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mhe_scale.data.xc_format import XCData


@dataclass(kw_only=True)
class XcDataConfig:
    """data section of the xmc task (Extreme Classification Repository sparse files)."""

    name: str = "xc"
    """Dataset kind: 'xc' (sparse XC files), 'text_tfidf' / 'text_embed' (a raw-text corpus turned into TF-IDF
    vectors / frozen-encoder embeddings once, cached: mhe_scale.data.text_features), or 'synthetic'."""
    path: Optional[str] = None
    """Folder or file of a real dataset (unused by 'synthetic'). 'xc': a folder holding train.txt and
    test.txt in the Extreme Classification Repository format; text_*: a corpus that data.text_format reads;
    a relative path is looked up from the working directory, then from the repository root."""
    normalize: str = "tfidf"
    """'xc': feature scaling, none | l2 | tfidf (idf from the training split, then L2 per row). text_* features
    are already L2-normalised and ignore it."""
    text_format: str = "auto"
    """text_*: the corpus layout, as the xmc_text task's data.text_format (raw | jsonl | reuters | eurlex | auto)."""
    text_fields: list[str] = field(default_factory=lambda: ["title", "content"])
    """text_* with text_format=jsonl: keys of each JSON line joined into the document text."""
    eval_split: str = "test"
    """text_*: split scored after training, test or dev (eurlex: make every choice on dev, score test once)."""
    max_features: Optional[int] = 50000
    """text_tfidf: vocabulary size (the most frequent terms of the training split); None = every term."""
    min_df: int = 2
    """text_tfidf: a term must occur in at least this many training documents."""
    sublinear_tf: bool = True
    """text_tfidf: term frequency 1 + ln(tf) instead of tf."""
    embed_model: str = "minilm"
    """text_embed: the frozen encoder, a local HF model folder or an alias ('minilm': all-MiniLM-L6-v2)."""
    max_length: int = 256
    """text_embed: tokens per document after truncation, [CLS] and [SEP] included."""
    embed_batch_size: int = 32
    """text_embed: documents per encoder batch while the embeddings are computed."""
    cache_dir: Optional[str] = None
    """text_*: folder of the row cache (HF datasets) and of the feature files; None = ~/.cache/mhe_scale."""
    max_train_points: Optional[int] = None
    """text_*: keep only the first N training documents (slices, smoke runs); None = all."""
    max_test_points: Optional[int] = None
    """text_*: keep only the first N documents of the eval split; None = all."""
    label_order: str = "given"
    """'xc': label ids as in the files (given) or renumbered so that similar labels get neighbouring ids,
    hence share MHE prefixes / MHC groups (cluster: balanced 2-means tree over the training data)."""
    propensity_a: float = 0.55
    """A of the inverse propensities for PSP@k (Jain et al. 2016; 0.6 for Amazon, 0.5 for Wikipedia)."""
    propensity_b: float = 1.5
    """B of the inverse propensities for PSP@k (2.6 for Amazon, 0.4 for Wikipedia)."""
    seed: int = 0
    """Seed of the generator (data is a pure function of the config)."""

FEATURE_SCALINGS = ("none", "l2", "tfidf")
LABEL_ORDERS = ("given", "cluster")


def _csr_parts(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sparse CSR [N, F] -> (crow [N+1] int64, col [nnz] int64, values [nnz] float32)."""
    if features.layout != torch.sparse_csr:
        raise ValueError(f"features must be a sparse CSR tensor (as read_xc_format returns), got layout "
                         f"{features.layout}; convert with .to_sparse_csr()")
    return (features.crow_indices().long(), features.col_indices().long(), features.values().float())


def _row_ids(crow: Tensor) -> Tensor:
    """Row index of every stored value: crow [N+1] -> [nnz]."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())


def idf_weights(features: Tensor) -> Tensor:
    """Smoothed inverse document frequency of each feature: CSR [N, F] -> float32 [F].

    idf_f = ln((1 + N) / (1 + df_f)) + 1, df_f = number of rows where feature f is non-zero.
    """
    crow, col, values = _csr_parts(features)
    n, num_features = features.shape
    df = torch.bincount(col[values != 0], minlength=num_features).double()
    return (torch.log((1.0 + n) / (1.0 + df)) + 1.0).float()


def scale_features(features: Tensor, normalize: str, idf: Tensor | None = None) -> Tensor:
    """Scaled copy of CSR features [N, F] (see the module doc); idf [F] is required for "tfidf"."""
    if normalize not in FEATURE_SCALINGS:
        raise ValueError(f"data.normalize={normalize!r} is not a feature scaling; choose one of {FEATURE_SCALINGS}")
    crow, col, values = _csr_parts(features)
    if normalize == "none":
        return features
    if normalize == "tfidf":
        if idf is None or idf.shape != (features.shape[1],):
            got = None if idf is None else tuple(idf.shape)
            raise ValueError(f"tfidf scaling needs idf [F={features.shape[1]}] from the training split "
                             f"(idf_weights(train_features)); got {got}")
        values = values * idf.float()[col]
    rows = _row_ids(crow)
    sq = torch.zeros(features.shape[0], dtype=torch.float64).index_add_(0, rows, values.double().square())
    values = (values.double() / sq.sqrt().clamp(min=1e-12)[rows]).float()
    with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=features.shape, dtype=torch.float32,
                                       check_invariants=False)


class XMCDataset(Dataset):
    """(dense features [F] float32, labels [Lmax] padded with -1) per point, from CSR storage.

    Args:
        features: sparse CSR [N, F] (already scaled, see scale_features).
        labels: LongTensor [N, Lmax] of label ids padded with -1.
    """

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        crow, col, values = _csr_parts(features)
        if labels.dim() != 2 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be [N={features.shape[0]}, L] padded with -1, got shape "
                             f"{tuple(labels.shape)}")
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            j = int(bad[0])
            row = int(torch.searchsorted(crow, torch.tensor(j), right=True)) - 1
            raise ValueError(f"features hold {float(values[j])} at point {row} (line {row + 2} of an XC file), feature "
                             f"{int(col[j])}; nan/inf values would turn the loss into nan: fix or drop them")
        self.crow, self.col, self.values = crow.contiguous(), col.contiguous(), values.contiguous()
        self.labels = labels.long().contiguous()
        self.num_features = int(features.shape[1])
        self.sparse_inputs = False

    @classmethod
    def from_xc(cls, data: XCData, normalize: str = "none", idf: Tensor | None = None) -> "XMCDataset":
        """From read_xc_format's result; for "tfidf" pass the training split's idf_weights."""
        if data.features is None:
            raise ValueError("this XCData was read with features=False; read it with features=True")
        return cls(scale_features(data.features, normalize, idf), data.labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, index: Tensor) -> Tensor:
        """Dense rows for point ids index [B] -> float32 [B, F] (one gather + one scatter)."""
        index = index.long()
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"point index out of range for a dataset of {len(self)} points")
        index = torch.where(index < 0, index + len(self), index)
        starts = self.crow[index]
        counts = self.crow[index + 1] - starts
        out = torch.zeros(index.numel(), self.num_features)
        total = int(counts.sum())
        if total == 0:
            return out
        batch_row = torch.repeat_interleave(torch.arange(index.numel()), counts)
        first = torch.cumsum(counts, 0) - counts  # position of each row's first value in the flat batch
        pos = starts[batch_row] + torch.arange(total) - first[batch_row]
        out[batch_row, self.col[pos]] = self.values[pos]
        return out

    def entries(self, index: Tensor, width: int | None = None) -> dict[str, Tensor]:
        """Stored entries of points index [B] -> {cols [B, T] int64, vals [B, T] float32}, T = the longest
        row's count (>= 1) or `width`; padding is col 0 with value 0 (adds nothing to a weighted sum)."""
        index = index.long()
        starts = self.crow[index]
        counts = self.crow[index + 1] - starts
        t = max(1, int(counts.max()) if index.numel() else 1) if width is None else width
        slot = torch.arange(t)
        keep = slot.unsqueeze(0) < counts.unsqueeze(1)
        pos = (starts.unsqueeze(1) + slot).clamp(max=max(0, self.col.numel() - 1))
        if self.col.numel() == 0:
            return {"cols": torch.zeros(index.numel(), t, dtype=torch.long), "vals": torch.zeros(index.numel(), t)}
        return {"cols": torch.where(keep, self.col[pos], 0), "vals": torch.where(keep, self.values[pos], 0.0)}

    def as_sparse_inputs(self) -> "XMCDataset":
        """The same points served as {cols, vals} entries (MLPEncoder with sparse_input) instead of dense rows."""
        out = self.with_labels(self.labels)
        out.sparse_inputs = True
        return out

    def __getitem__(self, i: int) -> tuple[Tensor | dict[str, Tensor], Tensor]:
        if getattr(self, "sparse_inputs", False):  # one point: padded to the widest row, so points collate
            width = max(1, int(self.crow.diff().max()) if len(self) else 1)
            return {k: v[0] for k, v in self.entries(torch.tensor([int(i)]), width).items()}, self.labels[i]
        return self.rows(torch.tensor([int(i)]))[0], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor | dict[str, Tensor], Tensor]]:
        """A whole batch at once (torch's DataLoader calls this when it exists)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        y = self.labels[index]
        if getattr(self, "sparse_inputs", False):
            x = self.entries(index)
            return [({"cols": c, "vals": v}, t) for c, v, t in zip(x["cols"].unbind(0), x["vals"].unbind(0), y.unbind(0))]
        x = self.rows(index)
        return list(zip(x.unbind(0), y.unbind(0)))

    def with_labels(self, labels: Tensor) -> "XMCDataset":
        """The same features with other labels [N, L] (e.g. renumbered by relabel)."""
        out = XMCDataset.__new__(XMCDataset)
        out.crow, out.col, out.values, out.num_features = self.crow, self.col, self.values, self.num_features
        out.sparse_inputs = getattr(self, "sparse_inputs", False)
        if labels.shape[0] != len(self):
            raise ValueError(f"labels must have {len(self)} rows, got {labels.shape[0]}")
        out.labels = labels.long().contiguous()
        return out


def relabel(labels: Tensor, new_id: Tensor) -> Tensor:
    """labels [N, L] padded with -1 -> the same with every id y replaced by new_id[y]."""
    return torch.where(labels >= 0, new_id[labels.clamp(min=0)], labels)


def label_centroids(data: XMCDataset, num_classes: int, max_dim: int = 1024, chunk: int = 4096,
                    seed: int = 0) -> Tensor:
    """Sum of each label's training rows, [C, d] float32 (d = F, or a seeded Gaussian projection to
    max_dim when F is larger); built chunk by chunk of points, never [N, F] at once."""
    proj = None
    if data.num_features > max_dim:
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(data.num_features, max_dim, generator=gen) / max_dim ** 0.5
    out = torch.zeros(num_classes, max_dim if proj is not None else data.num_features)
    for start in range(0, len(data), chunk):  # a loop over chunks of points, not over points
        index = torch.arange(start, min(start + chunk, len(data)))
        x = data.rows(index) if proj is None else _sparse_chunk(data, start, len(index)) @ proj  # cost ~ nnz
        labels = data.labels[index]
        keep = labels >= 0
        rows = torch.arange(len(index)).unsqueeze(1).expand_as(labels)[keep]
        out.index_add_(0, labels[keep], x[rows])
    return out


def _sparse_chunk(data: XMCDataset, start: int, count: int) -> Tensor:
    """Points start..start+count-1 as a torch sparse CSR [count, F] (no dense [count, F] block)."""
    crow = data.crow[start:start + count + 1]
    lo, hi = int(crow[0]), int(crow[-1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow - lo, data.col[lo:hi], data.values[lo:hi], size=(count, data.num_features),
                                       check_invariants=False)


def balanced_bisection_order(embeddings: Tensor, iters: int = 8) -> Tensor:
    """Order [C] of the rows of embeddings [C, d] (order[new id] = old id) by recursive balanced
    spherical 2-means: each segment splits into halves of sizes ceil(s/2), floor(s/2), the half
    closer to the first centroid first, down to single labels. All segments of a level at once."""
    emb = F.normalize(embeddings.float(), dim=1)
    c = emb.shape[0]
    order = torch.arange(c)
    starts, sizes = torch.zeros(1, dtype=torch.long), torch.tensor([c])
    while c > 0 and int(sizes.max()) > 1:
        s, m = sizes.numel(), int(sizes.max())
        slot = torch.arange(m)
        valid = slot.unsqueeze(0) < sizes.unsqueeze(1)  # [S, m]
        pos = (starts.unsqueeze(1) + slot).clamp(max=c - 1)
        members = order[pos]
        x = emb[members] * valid.unsqueeze(2)  # [S, m, d]
        left = (sizes + 1) // 2
        c0, c1 = x[:, 0], x[torch.arange(s), sizes - 1]  # two seeds per segment: its first and last member
        for _ in range(iters):
            score = torch.bmm(x, (c0 - c1).unsqueeze(2)).squeeze(2).masked_fill(~valid, float("-inf"))
            rank = score.argsort(dim=1, descending=True, stable=True)
            to_left = torch.zeros_like(valid).scatter_(1, rank, slot.unsqueeze(0) < left.unsqueeze(1))
            halves = torch.stack([to_left, valid & ~to_left], 1).float()  # [S, 2, m]
            c0, c1 = F.normalize(torch.bmm(halves, x), dim=2).unbind(1)
        order[pos[valid]] = members.gather(1, rank)[valid]
        starts = torch.stack([starts, starts + left], 1).flatten()
        sizes = torch.stack([left, sizes - left], 1).flatten()
        starts, sizes = starts[sizes > 0], sizes[sizes > 0]
    return order


def cluster_label_order(data: XMCDataset, num_classes: int, seed: int = 0) -> Tensor:
    """new_id [C]: label y becomes new_id[y] (see the module doc); apply with relabel()."""
    order = balanced_bisection_order(label_centroids(data, num_classes, seed=seed))
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(num_classes)
    return new_id
