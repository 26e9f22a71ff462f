"""Generalised-mean (GeM) pooling (Radenović et al. 2018; MultiGrain, Berman et al. 2019).

    GeM_p(x)[b, c] = ( mean_{h, w} max(x[b, c, h, w], ε)^p )^{1/p}          map [B, C, h, w] -> [B, C]

p = 1 is average pooling (of the ε-clamped map), p -> ∞ max pooling. p is either fixed (a buffer,
saved with the model but never trained) or learned (a parameter, e.g. p* fine-tuning at a new
test resolution, tools/pstar.py). GeM is size-agnostic: any backbone that exposes
`forward_feature_map` pools with it at any input size (pass it as the ResNet's `pool`, or wrap
any backbone with `GeMBackbone`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gem(x: Tensor, p: Tensor | float, eps: float = 1e-6) -> Tensor:
    """map [B, C, h, w] -> GeM_p [B, C] (computed in fp32 for half inputs; p a scalar or 0-d tensor)."""
    if x.dim() != 4:
        raise ValueError(f"GeM pools feature maps [B, C, h, w], got {list(x.shape)}")
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    x = x.to(dtype).clamp_min(eps)
    if not torch.is_tensor(p) and p == 1.0:  # fixed p = 1: plain average pooling, no pow / root
        return x.mean(dim=(2, 3))
    p = torch.as_tensor(p, dtype=dtype, device=x.device)
    # mean(x^p)^(1/p); x >= eps > 0, so the power and the root are differentiable in x and p
    return x.pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling layer: map [B, C, h, w] -> [B, C].

    Args:
        p: the exponent (>= 1; 1 = average pooling, 3 = MultiGrain's training value).
        learn_p: make p a trainable parameter (else a buffer).
        eps: lower clamp of the activations (keeps x^p and its root finite).
    """

    def __init__(self, p: float = 3.0, learn_p: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if p < 1.0:
            raise ValueError(f"GeM p must be >= 1 (1 = average pooling), got {p}")
        if eps <= 0:
            raise ValueError(f"GeM eps must be > 0, got {eps}")
        self.eps, self.learn_p = float(eps), bool(learn_p)
        value = torch.tensor(float(p))
        if learn_p:
            self.p = nn.Parameter(value)
        else:
            self.register_buffer("p", value)

    def set_p(self, p: float) -> None:
        """Change p in place (e.g. p* = 4 for testing at 500 after training with p = 3 at 224)."""
        if p < 1.0:
            raise ValueError(f"GeM p must be >= 1, got {p}")
        with torch.no_grad():
            self.p.fill_(float(p))

    def make_learnable(self) -> nn.Parameter:
        """Turn a fixed p (buffer) into a trainable parameter with the same value (p* fine-tuning)."""
        if not self.learn_p:
            value = self.p.detach().clone()
            del self._buffers["p"]
            self.p = nn.Parameter(value)
            self.learn_p = True
        return self.p  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        if not self.learn_p and float(self.p) == 1.0:  # fast path (a fixed buffer: no graph through p)
            return gem(x, 1.0, self.eps)
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, learn_p={self.learn_p}, eps={self.eps:g}"


class GeMBackbone(nn.Module):
    """Any backbone with `forward_feature_map` ([B, C, h, w]) and `num_features`, pooled by GeM:
    images [B, 3, H, W] (any H, W) -> [B, num_features]."""

    def __init__(self, backbone: nn.Module, pool: GeM) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_feature_map"):
            raise ValueError(f"{type(backbone).__name__} has no forward_feature_map; GeM needs an unpooled map")
        self.backbone, self.pool = backbone, pool
        self.num_features = int(backbone.num_features)

    def forward_feature_map(self, x: Tensor) -> Tensor:
        return self.backbone.forward_feature_map(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.backbone.forward_feature_map(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def find_gem(model: nn.Module) -> GeM:
    """The (single) GeM layer inside `model`; a one-line error when there is none or several."""
    found = [m for m in model.modules() if isinstance(m, GeM)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__} holds {len(found)} GeM layers; expected exactly one "
                         "(build the backbone with pool=GeM(...))")
    return found[0]
