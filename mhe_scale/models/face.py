"""Face-recognition backbones by name, and their parameter / multiply-accumulate counts.

    model = build_face_backbone("iresnet50", num_features=512, dropout=0.0)
    model.forward_features(images [B, 3, 112, 112]) -> embeddings [B, 512]

Names: iresnet18/34/50/100/200 (IResNet), mobilefacenet, vit_t/vit_s/vit_b/vit_l (FaceViT).
Keyword arguments go to the model's constructor (see each class's docstring); every model has
`num_features`, `forward_features`, `set_grad_checkpointing`. Build on the meta device
(`with torch.device("meta"): ...`) to count parameters or MACs without allocating weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mhe_scale.models.face_vit import Attention, FaceViT
from mhe_scale.models.iresnet import IRESNET_LAYERS, IResNet
from mhe_scale.models.mobilefacenet import MobileFaceNet


@dataclass(kw_only=True)
class FaceModelConfig:
    """model section of the face task: a face backbone."""

    name: str = "iresnet50"
    """Encoder: 'mlp' (more are registered by tasks)."""
    num_features: int = 256
    """Embedding size D that the head sees."""
    dropout: float = 0.0
    """Dropout before the embedding."""
    width_mult: float = 1.0
    """mobilefacenet: channel width multiplier (small values for tests and CPU runs)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (less memory, slower steps; BN statistics update once)."""
    sync_batchnorm: bool = False
    """With several processes, BatchNorm statistics over all of them (torch.nn.SyncBatchNorm, GPU
    only); false: each process normalises with its own micro-batch (differs from one process)."""

FACE_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{f"iresnet{depth}": partial(IResNet, layers) for depth, layers in IRESNET_LAYERS.items()},
    "mobilefacenet": MobileFaceNet,
    "vit_t": partial(FaceViT, embed_dim=256, depth=12, num_heads=8),
    "vit_s": partial(FaceViT, embed_dim=512, depth=12, num_heads=8),
    "vit_b": partial(FaceViT, embed_dim=512, depth=24, num_heads=8),
    "vit_l": partial(FaceViT, embed_dim=768, depth=24, num_heads=8),
}


def list_face_backbones() -> list[str]:
    return list(FACE_BACKBONES)


def build_face_backbone(name: str, **kwargs: object) -> nn.Module:
    """A face backbone by registry name; kwargs are its constructor's keyword arguments."""
    if name not in FACE_BACKBONES:
        raise ValueError(f"unknown face backbone {name!r}; known: {', '.join(FACE_BACKBONES)}")
    try:
        return FACE_BACKBONES[name](**kwargs)
    except TypeError as err:  # an unknown keyword: say which model refused it
        raise TypeError(f"face backbone {name!r}: {err}") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, size: int = 112, batch: int = 1) -> int:
    """Multiply-accumulates of one eval-mode forward of `batch` images [3, size, size], per image.

    Counted by torch.utils.flop_counter.FlopCounterMode, which sees convolutions, matrix products
    and attention (2 FLOPs per MAC) but not normalisation, activations or additions; that is the
    usual convention of published "FLOPs" for face backbones. Runs on the model's device: build the
    model on the meta device to count without computing. On CPU the fused attention kernel is not
    seen by the counter, so a CPU model with attention is refused (build it on meta instead).
    """
    device = next(model.parameters()).device
    if device.type == "cpu" and any(isinstance(m, (Attention, nn.MultiheadAttention)) for m in model.modules()):
        raise ValueError("count_macs: the counter misses CPU attention kernels; build the model on the meta device "
                         "(with torch.device('meta'): build_face_backbone(...)) and count that")
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(batch, 3, size, size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // (2 * batch)
