"""The one interface every classification head implements.

    head = create_head("mhp", in_features=512, num_classes=2_000_000, num_heads=2)
    out = head(features, targets)          # features [B, D], targets [B] or [B, L] (PAD=-1)
    out.loss.backward()
    scores, ids = head.predict(features, k=5)   # [B, k] each; ids are global label ids

Targets: single-label heads take LongTensor [B]; multi-label heads take LongTensor [B, L],
each row's labels padded with PAD (-1) (see mhe_scale.labels.targets).
predict returns the k best labels per row by the head's own score, descending; where fewer
than k labels exist, the remaining ids are -1 with score -inf.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from mhe_scale.labels.codec import check_label_range


class HeadOutput(NamedTuple):
    """What `head(features, targets)` returns (a named tuple: ZeRO-3 hooks a module's backward
    through the tensors of tuple / dict outputs, so a head can be a ZeRO-3 leaf module).

    loss: scalar, the mean over the batch (what backward is called on).
    metrics: detached scalars worth logging (e.g. sampled-class count), never used for grads.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = {}  # never mutated: heads build a new dict


class ClassifierHead(nn.Module, ABC):
    """Base class: maps features [B, D] to a training loss and to top-k predictions.

    A head always computes with autocast off, also when called inside torch.autocast (the
    encoder's mixed precision ends at the features): its logits, margins and losses stay in the
    head's own dtype (fp32), the precision the softmax over millions of classes needs.
    """

    in_features: int
    num_classes: int
    multilabel: bool

    def __init__(self, in_features: int, num_classes: int, multilabel: bool = False) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.multilabel = bool(multilabel)

    def __call__(self, features: Tensor, *args: Any, **kwargs: Any) -> Any:
        device = features.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return super().__call__(features, *args, **kwargs)
        return super().__call__(features, *args, **kwargs)

    @abstractmethod
    def forward(self, features: Tensor, targets: Tensor) -> HeadOutput:
        """features [B, D], targets [B] (single-label) or [B, L] padded with -1 -> HeadOutput."""

    @abstractmethod
    def predict(self, features: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """features [B, D] -> (scores [B, k], global label ids [B, k]), best first."""

    def chance_loss(self) -> float | None:
        """The training loss of a model that predicts no better than the label frequencies (balanced labels),
        e.g. ln C for a C-way softmax; None when the head's loss has no such fixed level (the engine's
        training-health check, engine/health.py, warns when a run sits at it)."""
        return None

    def check_inputs(self, features: Tensor, targets: Tensor) -> None:
        """Shape and range checks with errors that say what to fix."""
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects features [B, {self.in_features}], got {tuple(features.shape)}"
            )
        want = 2 if self.multilabel else 1
        if targets.dim() != want or targets.shape[0] != features.shape[0]:
            layout = "[B, L] padded with -1" if self.multilabel else "[B]"
            raise ValueError(
                f"{type(self).__name__} (multilabel={self.multilabel}) expects targets {layout} "
                f"with B={features.shape[0]}, got {tuple(targets.shape)}"
            )
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets must be an integer tensor of label ids, got {targets.dtype}")
        check_label_range(targets, self.num_classes, allow_pad=self.multilabel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, multilabel={self.multilabel}"


def upcast(t: Tensor) -> Tensor:
    """Cast half/bf16 to fp32 (head logits and losses stay in fp32); fp32/fp64 pass through."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def pad_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Right-pad [B, k'] predictions to [B, k] with score -inf and id -1."""
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    b = scores.shape[0]
    scores = torch.cat([scores, scores.new_full((b, missing), float("-inf"))], dim=1)
    ids = torch.cat([ids, ids.new_full((b, missing), -1)], dim=1)
    return scores, ids


# ---------------------------------------------------------------- registry (config boundary)
_HEADS: dict[str, type[ClassifierHead]] = {}
H = TypeVar("H", bound=type[ClassifierHead])


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make a head constructible by name from configs."""

    def wrap(cls: H) -> H:
        if name in _HEADS:
            raise ValueError(f"head name {name!r} is already registered to {_HEADS[name].__name__}")
        _HEADS[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def list_heads() -> list[str]:
    return sorted(_HEADS)


def head_class(name: str) -> type[ClassifierHead]:
    if name not in _HEADS:
        raise KeyError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}")
    return _HEADS[name]


def head_arguments(name: str) -> list[str]:
    """Keyword arguments a registered head's constructor accepts."""
    params = inspect.signature(head_class(name).__init__).parameters
    return [p for p in params if p != "self"]


def create_head(name: str, **kwargs: object) -> ClassifierHead:
    """Build a registered head; unknown keyword arguments are an error naming them."""
    cls = head_class(name)
    allowed = set(head_arguments(name))
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"head {name!r} does not take {unknown}; it takes {sorted(allowed)}")
    return cls(**kwargs)  # type: ignore[arg-type]
