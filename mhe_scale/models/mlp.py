"""A small MLP encoder for vector inputs (synthetic data, BoW/TF-IDF features).

With sparse_input the inputs are the stored entries of sparse rows, {cols [B, T], vals [B, T]}
(XMCDataset.as_sparse_inputs; padding: col 0, value 0), and the first layer is SparseLinear:
the same map as Linear on the dense row, sum_t vals[b, t] * W[cols[b, t]] + bias, computed by
an embedding-bag sum, so its cost follows the non-zeros (TF-IDF rows of 20,000 terms hold ~230).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(kw_only=True)
class MlpConfig:
    """model section of tasks with vector inputs: the MLP encoder."""

    name: str = "mlp"
    """Encoder: 'mlp' (more are registered by tasks)."""
    hidden: int = 512
    """Hidden width of the MLP encoder."""
    num_features: int = 256
    """Embedding size D that the head sees."""
    depth: int = 2
    """Number of hidden layers."""
    dropout: float = 0.0
    """Dropout before the embedding."""
    sparse_input: bool = False
    """Inputs are sparse rows' stored entries {cols, vals} and the first layer a SparseLinear (cost per non-zero,
    not per feature); the xmc task then feeds XMCDataset.as_sparse_inputs()."""


class SparseLinear(nn.Module):
    """{cols [B, T] int64, vals [B, T] float32} -> [B, out_dim] = Linear(in_dim, out_dim) of the dense rows.

    weight [in_dim, out_dim] (row f = feature f's column of the dense Linear), initialised as nn.Linear."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_dim).uniform_(-bound, bound))

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        return F.embedding_bag(x["cols"], self.weight, per_sample_weights=x["vals"].to(self.weight.dtype),
                               mode="sum") + self.bias

    def extra_repr(self) -> str:
        return f"in_dim={self.weight.shape[0]}, out_dim={self.weight.shape[1]}"


class MLPEncoder(nn.Module):
    """inputs [B, in_dim] (or {cols, vals} with sparse_input) -> features [B, num_features]: depth x (Linear,
    GELU), then Linear + LayerNorm; with sparse_input the first Linear is a SparseLinear."""

    def __init__(self, in_dim: int, hidden: int = 512, num_features: int = 256, depth: int = 2,
                 dropout: float = 0.0, sparse_input: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        linear = lambda i, o: SparseLinear(i, o) if sparse_input and not layers else nn.Linear(i, o)  # noqa: E731
        for _ in range(depth):
            layers += [linear(width, hidden), nn.GELU()]
            width = hidden
        if sparse_input and not layers:
            raise ValueError("model.sparse_input=true needs model.depth >= 1 (the sparse layer is the first hidden one)")
        layers += [nn.Dropout(dropout), nn.Linear(width, num_features), nn.LayerNorm(num_features)]
        self.body = nn.Sequential(*layers)
        self.num_features = num_features

    def forward_features(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.forward_features(x)


def build_encoder(cfg: MlpConfig, in_dim: int) -> nn.Module:
    if cfg.name != "mlp":
        raise ValueError(f"model.name={cfg.name!r} is not available here; known: mlp")
    return MLPEncoder(in_dim, cfg.hidden, cfg.num_features, cfg.depth, cfg.dropout, cfg.sparse_input)
