"""Config boundary for heads: HeadConfig -> a registered head, strictly."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import ListConfig

from mhe_scale.config import ConfigError, HeadConfig
from mhe_scale.heads.base import ClassifierHead, create_head, head_arguments, list_heads

_FROM_DATA = ("in_features", "num_classes", "multilabel")


def head_kwargs(cfg: HeadConfig) -> dict[str, Any]:
    """The arguments set in cfg (None = keep the head's default), checked against the head."""
    if cfg.name not in list_heads():
        raise ConfigError(f"head.name={cfg.name!r} is not a registered head; choose one of {list_heads()}")
    accepted = set(head_arguments(cfg.name))
    kwargs: dict[str, Any] = {}
    for f in fields(HeadConfig):
        if f.name == "name":
            continue
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if f.name not in accepted:
            takes = sorted(accepted - set(_FROM_DATA))
            raise ConfigError(f"head.{f.name} is set but head {cfg.name!r} does not take it; it takes {takes}")
        kwargs[f.name] = list(value) if isinstance(value, ListConfig) else value
    return kwargs


def build_head(cfg: HeadConfig, in_features: int, num_classes: int, multilabel: bool) -> ClassifierHead:
    """Build the head named by cfg.name for D=in_features and C=num_classes."""
    return create_head(cfg.name, in_features=in_features, num_classes=num_classes, multilabel=multilabel,
                       **head_kwargs(cfg))
