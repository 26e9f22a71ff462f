"""Modified ML-GCN (Chen et al. 2019, as changed by Prokofiev & Sovrasov 2022): a label graph turned
into a channel-attention vector that scales the backbone's feature map before pooling.

    counts  n_ij = #images holding both i and j (n_ii = #images holding i), from the TRAINING split
    M[i, j] = n_ij / n_ii  (≈ P(j | i); a class never seen gets an empty row)
    B = [M >= τ] off the diagonal (τ = 0.4)
    R[i, j] = ρ B[i, j] / Σ_j' B[i, j']   (ρ = 0.25; rows without neighbours stay 0)
    Â = D^-1/2 (R + I) D^-1/2,  D = diag(row sums of R + I)
    H1 = LeakyReLU_0.2(Â E W1),  H2 = Â H1 W2      E [C, e] label embeddings (a .npy, frozen, or learned)
    a = sigmoid(max over classes of H2)  [D]     (does not depend on the image)
    map [B, D, h, w] -> mean over h, w of map * a -> linear logits or cosines [B, C]

For export the attention vector is a constant: `freeze_attention()` computes it from the loaded
weights once, so the exported graph holds a [D] constant and no graph convolution.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cooccurrence_adjacency(targets: Tensor, tau: float = 0.4, rho: float = 0.25) -> Tensor:
    """Training multi-hot targets [N, C] (bool / {0, 1}) -> normalised label graph Â [C, C] float32."""
    if targets.dim() != 2:
        raise ValueError(f"cooccurrence_adjacency: targets must be [N, C], got {list(targets.shape)}")
    if not 0.0 <= tau <= 1.0 or not 0.0 <= rho <= 1.0:
        raise ValueError(f"ml_gcn: tau={tau} and rho={rho} must be in [0, 1]")
    y = (targets > 0).double()
    counts = y.t() @ y                                                       # [C, C]
    per_class = counts.diagonal().clone()
    m = counts / per_class.clamp_min(1).unsqueeze(1)                         # P(j | i)
    b = (m >= tau).double()
    b.fill_diagonal_(0)
    b[per_class == 0] = 0
    r = rho * b / b.sum(1, keepdim=True).clamp_min(1)
    a = r + torch.eye(len(r), dtype=r.dtype)
    d = a.sum(1).rsqrt()
    return (d.unsqueeze(1) * a * d.unsqueeze(0)).float()


def load_label_embeddings(path: str | Path, num_classes: int) -> Tensor:
    """A float .npy [C, e] (rows in sorted-class order) -> float32 Tensor; errors name the file."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"ml_gcn label embeddings {path}: cannot read a .npy array ({err})") from None
    if array.ndim != 2 or array.shape[0] != num_classes or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"ml_gcn label embeddings {path}: expected a float array [{num_classes}, e] (one row per "
                         f"class in sorted order), got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(array.astype(np.float32))


class MLGCNHead(nn.Module):
    """feature map [B, D, h, w] -> scores [B, C] (logits, or cosines when cosine) with GCN channel attention."""

    input_kind = "map"

    def __init__(self, in_features: int, num_classes: int, adjacency: Tensor, embeddings: Tensor | None = None,
                 embed_dim: int = 300, hidden: int = 1024, cosine: bool = False) -> None:
        super().__init__()
        if adjacency.shape != (num_classes, num_classes):
            raise ValueError(f"ml_gcn: adjacency must be [{num_classes}, {num_classes}], got {list(adjacency.shape)}")
        self.num_classes, self.cosine = num_classes, cosine
        self.register_buffer("adjacency", adjacency.float().clone())
        if embeddings is not None:  # given (e.g. word vectors): kept fixed, saved with the model
            self.register_buffer("label_embeddings", embeddings.float().clone())
        else:
            self.label_embeddings = nn.Parameter(torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim))
        e = self.label_embeddings.shape[1]
        self.gc1, self.gc2 = nn.Linear(e, hidden, bias=False), nn.Linear(hidden, in_features, bias=False)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-bound, bound))
        self.bias = None if cosine else nn.Parameter(torch.zeros(num_classes))
        self.frozen_attention: Tensor | None = None

    def attention(self) -> Tensor:
        """The channel-attention vector a [D] (module docstring)."""
        h = F.leaky_relu(self.adjacency @ self.gc1(self.label_embeddings), 0.2)
        return torch.sigmoid((self.adjacency @ self.gc2(h)).amax(0))

    def freeze_attention(self) -> None:
        """Compute a from the current weights and use it as a constant from now on (export)."""
        with torch.no_grad():
            self.frozen_attention = self.attention().detach().clone()

    def forward(self, feature_map: Tensor) -> Tensor:
        if feature_map.dim() != 4:
            raise ValueError(f"ml_gcn reads a feature map [B, D, h, w], got {list(feature_map.shape)}")
        a = self.frozen_attention if self.frozen_attention is not None else self.attention()
        pooled = (feature_map * a.to(feature_map.dtype).view(1, -1, 1, 1)).mean((2, 3))
        if self.cosine:
            return F.normalize(pooled, dim=-1) @ F.normalize(self.weight, dim=-1).t()
        return F.linear(pooled, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, cosine={self.cosine}"
