"""A small MLP encoder for vector inputs (synthetic data, BoW/TF-IDF features)."""

from __future__ import annotations

from dataclasses import dataclass

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


class MLPEncoder(nn.Module):
    """inputs [B, in_dim] -> features [B, num_features]: depth x (Linear, GELU), then Linear + LayerNorm."""

    def __init__(self, in_dim: int, hidden: int = 512, num_features: int = 256, depth: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers += [nn.Dropout(dropout), nn.Linear(width, num_features), nn.LayerNorm(num_features)]
        self.body = nn.Sequential(*layers)
        self.num_features = num_features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def build_encoder(cfg: MlpConfig, in_dim: int) -> nn.Module:
    if cfg.name != "mlp":
        raise ValueError(f"model.name={cfg.name!r} is not available here; known: mlp")
    return MLPEncoder(in_dim, cfg.hidden, cfg.num_features, cfg.depth, cfg.dropout)
