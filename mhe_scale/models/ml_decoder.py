"""ML-Decoder (Ridnik et al. 2023) as used by Prokofiev & Sovrasov 2022: spatial tokens [B, N, D] -> scores [B, C].

    tokens [B, N, D] -> Linear(D, E) + ReLU                                  keys / values [B, N, E]
    queries Q [G, E]: fixed random (a buffer, never trained)
    h = LayerNorm(Q + Dropout(CrossAttention(Q, kv)))                                    [B, G, E]
    h = LayerNorm(h + Dropout(FFN(h)))           FFN = Linear(E, F) - ReLU - Dropout - Linear(F, E)
    group FC: W [G, E, r], r = ceil(C / G); logits[b, g*r + j] = h[b, g] . W[g, :, j] (one einsum),
              the first C outputs kept, + bias [C]
    cosine:   h and W L2-normalised along E first (cosines for AAM), the learned bias kept.

No self-attention among the queries (the decoder's self-attention is dropped: the queries are
constant, so it would only add a fixed transform). G defaults to min(100, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLDecoder(nn.Module):
    """tokens [B, N, in_features] -> scores [B, num_classes] (logits, or cosines + bias when cosine)."""

    input_kind = "tokens"

    def __init__(self, in_features: int, num_classes: int, num_groups: int | None = None, embed_dim: int = 768,
                 num_heads: int = 8, ff_dim: int = 2048, dropout: float = 0.1, cosine: bool = False,
                 query_seed: int = 0) -> None:
        super().__init__()
        groups = min(100, num_classes) if num_groups is None else num_groups
        if not 1 <= groups <= num_classes:
            raise ValueError(f"ml_decoder: num_groups={groups} must be in [1, num_classes={num_classes}]")
        if embed_dim % num_heads:
            raise ValueError(f"ml_decoder: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.num_classes, self.num_groups, self.cosine = num_classes, groups, cosine
        self.per_group = math.ceil(num_classes / groups)
        self.embed = nn.Linear(in_features, embed_dim)
        generator = torch.Generator().manual_seed(query_seed)
        self.register_buffer("queries", torch.randn(groups, embed_dim, generator=generator))
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ff_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ff_dim, embed_dim))
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.group_weight = nn.Parameter(torch.empty(groups, embed_dim, self.per_group))
        nn.init.xavier_normal_(self.group_weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def group_features(self, tokens: Tensor) -> Tensor:
        """tokens [B, N, D] -> decoded group features h [B, G, E]."""
        if tokens.dim() != 3:
            raise ValueError(f"ml_decoder reads tokens [B, N, D], got {list(tokens.shape)}")
        kv = F.relu(self.embed(tokens))
        q = self.queries.to(kv.dtype).unsqueeze(0).expand(kv.shape[0], -1, -1)
        attended, _ = self.attention(q, kv, kv, need_weights=False)
        h = self.norm1(q + self.dropout1(attended))
        return self.norm2(h + self.dropout2(self.ffn(h)))

    def group_fc(self, h: Tensor) -> Tensor:
        """h [B, G, E] -> scores [B, C]: the group fully-connected layer as one batched einsum."""
        weight = self.group_weight
        if self.cosine:
            h, weight = F.normalize(h, dim=-1), F.normalize(weight, dim=1)
        out = torch.einsum("bge,ger->bgr", h, weight).flatten(1)
        return out[:, : self.num_classes] + self.bias

    def forward(self, tokens: Tensor) -> Tensor:
        return self.group_fc(self.group_features(tokens))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_groups={self.num_groups}, per_group={self.per_group}, cosine={self.cosine}"
