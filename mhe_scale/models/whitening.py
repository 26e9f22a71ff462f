"""PCA whitening of embeddings, inserted after pooling and folded into the classifier (MultiGrain).

    fit:     μ = mean(f), C = cov(f) = U diag(λ) Uᵀ,  M = diag((λ + ε)^{-1/2}) Uᵀ       f [N, D]
    whiten:  w = M (e − μ)                                                  e [B, D] -> w [B, D]
    fold:    classifier logits = A e + b = A M⁻¹ w + (A μ + b)  ->  Linear(A M⁻¹, A μ + b)

So the network `backbone -> whitening -> folded classifier` computes exactly the logits of
`backbone -> classifier` (top-1 unchanged), while retrieval uses the whitened embedding w
(L2-normalised). Folding needs the full-rank square M (dim = D); a reduced `dim` whitens for
retrieval only. The parameters are buffers (not trained); save / load with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class Whitening(nn.Module):
    """e [B, D] -> M (e − μ) [B, dim]; buffers mean [D], matrix [dim, D]."""

    def __init__(self, mean: Tensor, matrix: Tensor) -> None:
        super().__init__()
        if mean.dim() != 1 or matrix.dim() != 2 or matrix.shape[1] != mean.shape[0]:
            raise ValueError(f"whitening: mean must be [D] and matrix [dim, D], got {list(mean.shape)} and "
                             f"{list(matrix.shape)}")
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("matrix", matrix.detach().clone())

    @classmethod
    def fit(cls, features: Tensor, dim: int | None = None, eps: float = 1e-6) -> "Whitening":
        """PCA whitening of features [N, D] (fp64 internally), keeping the `dim` leading components."""
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(f"whitening.fit needs features [N >= 2, D], got {list(features.shape)}")
        d = features.shape[1]
        dim = d if dim is None else dim
        if not 1 <= dim <= d:
            raise ValueError(f"whitening dim={dim} must be in [1, {d}]")
        f = features.detach().double()
        mean = f.mean(0)
        centred = f - mean
        cov = centred.t() @ centred / (f.shape[0] - 1)
        eigval, eigvec = torch.linalg.eigh(cov)  # ascending
        order = eigval.argsort(descending=True)[:dim]
        matrix = torch.diag((eigval[order].clamp_min(0) + eps).rsqrt()) @ eigvec[:, order].t()
        return cls(mean.to(features.dtype), matrix.to(features.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype).t()

    def save(self, path: str | Path) -> None:
        save_file({"mean": self.mean.contiguous(), "matrix": self.matrix.contiguous()}, str(path))

    @classmethod
    def from_file(cls, path: str | Path) -> "Whitening":
        state = load_file(str(path))
        if set(state) != {"mean", "matrix"}:
            raise ValueError(f"{path}: expected tensors 'mean' and 'matrix', found {sorted(state)}")
        return cls(state["mean"], state["matrix"])


def fold_into_classifier(classifier: nn.Linear, whitening: Whitening) -> nn.Linear:
    """A Linear on whitened embeddings giving the same logits as `classifier` on raw ones."""
    m = whitening.matrix.double()
    if m.shape[0] != m.shape[1]:
        raise ValueError(f"whitening to dim {m.shape[0]} < {m.shape[1]} cannot be folded into the classifier "
                         "(no inverse); fit it with dim=None")
    a = classifier.weight.detach().double()
    b = classifier.bias.detach().double() if classifier.bias is not None else torch.zeros(a.shape[0], dtype=torch.float64)
    folded = nn.Linear(m.shape[0], a.shape[0]).to(classifier.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(torch.linalg.solve(m.t(), a.t()).t())  # A M⁻¹, without forming the inverse
        folded.bias.copy_(b + a @ whitening.mean.double())
    return folded


class WhitenedBackbone(nn.Module):
    """backbone.forward_features, then whitening: images -> [B, dim] (same interface, num_features = dim)."""

    def __init__(self, backbone: nn.Module, whitening: Whitening) -> None:
        super().__init__()
        self.backbone, self.whitening = backbone, whitening
        self.num_features = int(whitening.matrix.shape[0])

    def forward_features(self, x: Tensor) -> Tensor:
        return self.whitening(self.backbone.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
