"""Config boundary for heads: HeadConfig -> a registered head, strictly."""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

from omegaconf import ListConfig

from mhe_scale.config import ConfigError, HeadConfig
from mhe_scale.heads.base import ClassifierHead, create_head, head_arguments, list_heads

_FROM_DATA = ("in_features", "num_classes", "multilabel")
MHP_MULTILABEL_WARNING = (
    "head.name=mhp on a multi-label task: the product head's digits are shared by many labels, and on real "
    "multi-label data it ranks below the most-frequent-labels baseline (Delicious P@1 28.0 vs 40.8 in "
    "docs/benchmarks.md; also Enron and Corel5k); use head.name=mhc (or fc) for multi-label data")


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
    if "sizes" in kwargs and len(kwargs["sizes"]) == 0:
        raise ConfigError("head.sizes=[] is empty; give the head sizes (e.g. head.sizes=[64,64], product >= C) "
                          "or leave head.sizes unset (null) for the default factorize(C, head.num_heads)")
    return kwargs


def build_head(cfg: HeadConfig, in_features: int, num_classes: int, multilabel: bool) -> ClassifierHead:
    """Build the head named by cfg.name for D=in_features and C=num_classes."""
    kwargs = head_kwargs(cfg)
    if cfg.name == "mhp" and multilabel:
        warnings.warn(MHP_MULTILABEL_WARNING, UserWarning)  # same text and line: shown once per process
    return create_head(cfg.name, in_features=in_features, num_classes=num_classes, multilabel=multilabel,
                       **kwargs)
