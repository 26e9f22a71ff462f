"""Encoders with a timm-like interface (forward_features, num_features); heads attach to num_features."""

from mhe_scale.models.mlp import MLPEncoder, build_encoder

__all__ = ["MLPEncoder", "build_encoder"]
