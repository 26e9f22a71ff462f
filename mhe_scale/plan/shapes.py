"""What the memory model needs from a config: the encoder's size and a first activation line, all on the
meta device (no weights allocated, no data read).

    shape = backbone_shape(cfg)            # BackboneShape(params, largest_layer, dim, input_shape, ...)
    line = meta_activation_line(cfg, "bf16")   # bytes saved for backward at b = 2 and 4 -> base + slope * b

The activation line counts the tensors autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks)
in a training forward of the real encoder at b = 2 and b = 4 on the meta device, in the engine's dtype. It is
a lower bound of the activation peak (temporaries of the backward are not saved tensors); `--probe` replaces
it by a line fitted to measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mhe_scale.plan.memory import ActivationLine, HeadSpec

SUPPORTED_TASKS = ("synthetic", "face", "classify")


@dataclass(frozen=True)
class BackboneShape:
    params: int
    largest_layer: int
    """Parameters of the largest leaf module (what ZeRO-3 gathers at once at least)."""
    dim: int
    input_shape: tuple[int, ...]
    """One sample's input, e.g. (3, 112, 112) or (input_dim,)."""
    num_classes: int
    multilabel: bool


def _builder(cfg: Any) -> tuple[Callable[[], nn.Module], tuple[int, ...], int, bool]:
    """(encoder factory, per-sample input shape, C, multilabel) for the tasks the planner knows."""
    task = cfg.task
    if task == "synthetic":
        from mhe_scale.models import build_encoder

        return (lambda: build_encoder(cfg.model, cfg.data.input_dim), (cfg.data.input_dim,), cfg.data.num_classes,
                cfg.data.labels_per_point > 1)
    if task == "face":
        from mhe_scale.tasks.face import build_face_encoder

        size = cfg.data.image_size
        return lambda: build_face_encoder(cfg.model, size), (3, size, size), cfg.data.num_classes, False
    if task == "classify":
        from mhe_scale.models.image import build_image_model

        if cfg.data.num_classes is None or cfg.data.image_size is None:
            raise ValueError("mhe-scale plan: the classify config leaves data.num_classes / data.image_size to the "
                             "data; give them, e.g. data.num_classes=1000 data.image_size=224")
        size = cfg.data.image_size
        return lambda: build_image_model(cfg.model), (3, size, size), cfg.data.num_classes, False
    raise ValueError(f"mhe-scale plan knows the encoders of tasks {SUPPORTED_TASKS}, not {task!r}; for a BoW XMC "
                     "config plan the synthetic task with the same model and head sections (same MLP encoder): "
                     "data={name:synthetic,input_dim:F,num_classes:L,labels_per_point:5}")


def build_meta_encoder(cfg: Any) -> tuple[nn.Module, tuple[int, ...], int, bool]:
    factory, shape, classes, multilabel = _builder(cfg)
    with torch.device("meta"):
        encoder = factory()
    return encoder, shape, classes, multilabel


def backbone_shape(cfg: Any) -> BackboneShape:
    encoder, shape, classes, multilabel = build_meta_encoder(cfg)
    params = sum(p.numel() for p in encoder.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in encoder.modules()), default=0)
    return BackboneShape(params, largest, int(encoder.num_features), shape, int(classes), bool(multilabel))


def saved_bytes(encoder: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in encoder.forward_features(inputs)."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in encoder.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()._cdata
        if storage not in weights:  # a saved weight is no extra memory
            seen[storage] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encoder.forward_features(inputs)
    del out
    return sum(seen.values())


def meta_activation_line(cfg: Any, precision: str) -> ActivationLine:
    """base + per_sample * b from the saved tensors at b = 2 and b = 4 (dtype bf16 when precision is)."""
    encoder, shape, _, _ = build_meta_encoder(cfg)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    encoder = encoder.to(dtype).train()
    points = []
    for b in (2, 4):  # b = 1 would trip BatchNorm's train-mode check
        x = torch.empty((b, *shape), device="meta", dtype=dtype, requires_grad=False)
        points.append(saved_bytes(encoder, x))
    slope = (points[1] - points[0]) / 2
    return ActivationLine(max(points[0] - 2 * slope, 0), slope, "saved tensors on the meta device (lower bound)")


def head_spec(cfg: Any, shape: BackboneShape, world: int) -> HeadSpec:
    """HeadSpec of cfg.head with the sizes the head factory would choose (factorize(C, num_heads))."""
    from mhe_scale.heads import create_head
    from mhe_scale.heads.factory import head_kwargs

    head = cfg.head
    kwargs = head_kwargs(head)
    with torch.device("meta"):  # the real constructor resolves defaults (sizes, groups) and checks arguments
        real = create_head(head.name, in_features=shape.dim, num_classes=shape.num_classes,
                           multilabel=shape.multilabel, **kwargs)
    sizes = tuple(getattr(real, "sizes", ()) or ()) or None
    owner = real.linear if head.name == "mhp" else real
    return HeadSpec(head.name, shape.num_classes, shape.dim, sizes=sizes, sharded=bool(cfg.dist.shard_head),
                    bias=getattr(owner, "bias", None) is not None if head.name in ("fc", "mhs", "mhp") else None,
                    cosine=bool(getattr(real, "cosine", False)), sample_rate=float(getattr(real, "sample_rate", 1.0)),
                    mode=str(getattr(real, "mode", "per_sample")),
                    num_sampled_groups=int(getattr(real, "num_sampled_groups", 16)),
                    top_k_groups=int(getattr(real, "top_k_groups", 10)), hidden=int(getattr(real, "hidden", 300)),
                    label_bias=getattr(real, "prefix_bias", None) is not None if head.name == "mhc" else True,
                    multilabel=shape.multilabel,
                    row_sparse=bool(cfg.dist.shard_head) and head.name in ("partial_fc", "mhs", "mhc")
                    and cfg.optim.head_update in ("auto", "sparse"))
