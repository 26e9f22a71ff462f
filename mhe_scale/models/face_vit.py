"""Vision Transformer for 112x112 faces, sized like insightface's arcface_torch ViT configs.

    patches  Conv2d(3, D, 9, stride 9): 112 -> 12 x 12 = 144 tokens (the last 4 pixel rows and
             columns are not covered), + learned position embedding; no class token
    blocks   depth x pre-norm [x + MHSA(LN(x)); x + MLP(LN(x))], MLP = Linear(D, 4D) - ReLU6 -
             Linear(4D, D), qkv without bias, stochastic depth rising linearly to drop_path
    head     LN, flatten all tokens [B, 144 * D] - Linear(144 D, D, no bias) - BN1d -
             Linear(D, num_features, no bias) - BN1d

Sizes (embed_dim D, depth, heads; all with patch 9, 8 heads): vit_t 256/12, vit_s 512/12,
vit_b 512/24, vit_l 768/24. Token masking (`mask_ratio`, insightface trains vit_t/s/b with 0.1):
in training a random subset of tokens skips the blocks and is replaced by a learned mask token
before the head, as insightface does; 0 disables it.
Attention uses F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

HEAD_BN_EPS = 2e-5


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch x [B, ...] with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    """x [B, N, D] -> [B, N, D], multi-head self-attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D / heads]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block, x [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU6(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class FaceViT(nn.Module):
    """images [B, 3, S, S] (S = img_size, normalised) -> embeddings [B, num_features].

    Args:
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads (D divisible by it).
        num_features: embedding size.
        img_size: image side S (112 for faces).
        patch_size: patch side; (S // patch_size)^2 tokens.
        mlp_ratio: MLP hidden width / D.
        drop_path: stochastic depth rate of the last block (linear from 0 over depth).
        mask_ratio: fraction of tokens masked in training (0 = off).
    """

    def __init__(self, embed_dim: int = 256, depth: int = 12, num_heads: int = 8, num_features: int = 512,
                 img_size: int = 112, patch_size: int = 9, mlp_ratio: float = 4.0, drop_path: float = 0.1,
                 mask_ratio: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0 or not 0.0 <= drop_path < 1.0:
            raise ValueError(f"mask_ratio and drop_path must lie in [0, 1), got {mask_ratio}, {drop_path}")
        self.img_size, self.num_features, self.mask_ratio = img_size, num_features, mask_ratio
        self.num_patches = (img_size // patch_size) ** 2
        if self.num_patches == 0:
            raise ValueError(f"patch_size {patch_size} is larger than img_size {img_size}")
        self.grad_checkpointing = False
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Sequential(nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
                                  nn.BatchNorm1d(embed_dim, eps=HEAD_BN_EPS),
                                  nn.Linear(embed_dim, num_features, bias=False),
                                  nn.BatchNorm1d(num_features, eps=HEAD_BN_EPS))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pos_embed.is_meta:  # built on the meta device to be counted or sharded: nothing to fill
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (RNG of drop_path is replayed)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"FaceViT expects images [B, 3, {self.img_size}, {self.img_size}], got "
                             f"{list(x.shape)}; resize/align faces or build with img_size={x.shape[-1]}")
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        b, n, d = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:  # keep a random subset of tokens per sample: the first `keep` of a random order
            keep = max(1, int(n * (1.0 - self.mask_ratio)))
            order = torch.rand(b, n, device=x.device).argsort(dim=1)
            x = x.gather(1, order[:, :keep, None].expand(-1, -1, d))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        if masking:  # put kept tokens back at their positions, mask tokens elsewhere
            full = self.mask_token.to(x.dtype).expand(b, n, d).clone()
            x = full.scatter(1, order[:, :keep, None].expand(-1, -1, d), x)
        return self.head(x.reshape(b, n * d))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
