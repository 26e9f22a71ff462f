"""Image-classification backbones by name, with the face nets' interface.

    model = build_image_backbone("resnet50", stem="imagenet", width=64, pretrained_path=None)
    model.forward_features(images [B, 3, H, W]) -> pooled [B, num_features]   (MHE heads)
    model.forward_tokens(images)                -> tokens [B, N, num_features] (ML-Decoder)
    model.forward_feature_map(images)           -> map [B, num_features, h, w] (ML-GCN)

Names: resnet18/34/50/101/152 (mhe_scale/models/resnet.py, no torchvision needed), and
"timm:<name>" / "torchvision:<name>" through ExternalBackbone. timm and torchvision are imported
only when such a name is built (torchvision 0.28 does not import with the CPU torch 2.13 wheel;
see docs). Weights come only from a local safetensors file (`pretrained_path`): nothing is
downloaded and nothing is unpickled.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from mhe_scale.models.resnet import RESNET_LAYERS, resnet

IMAGE_BACKBONES: dict[str, Callable[..., nn.Module]] = {f"resnet{d}": partial(resnet, d) for d in RESNET_LAYERS}
EXTERNAL = {"timm": "pip install timm", "torchvision": "install the torchvision build that matches your torch "
            "(CUDA torch from the registry, or CPU wheels from download.pytorch.org)"}
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")


def list_image_backbones() -> list[str]:
    return [*IMAGE_BACKBONES, "timm:<name>", "torchvision:<name>"]


def import_external(package: str, name: str) -> object:
    """`import package`, or a one-line error naming the package, the backbone and the fix."""
    try:
        return importlib.import_module(package)
    except Exception as err:  # torchvision without its CUDA libraries fails with RuntimeError, not ImportError
        first = str(err).splitlines()[0] if str(err) else ""
        raise ImportError(f"image backbone {package}:{name} needs {package}, which does not import here "
                          f"({type(err).__name__}: {first}); {EXTERNAL[package]}, or use one of "
                          f"{', '.join(IMAGE_BACKBONES)} (no extra package)") from None


class _StopAt(Exception):
    """Raised by the forward pre-hook on a torchvision model's avgpool to stop its forward there."""

    def __init__(self, feature_map: Tensor) -> None:
        super().__init__()
        self.feature_map = feature_map


class ExternalBackbone(nn.Module):
    """A timm or torchvision classifier as a backbone: images [B, 3, H, W] -> the interface above.

    timm: created with num_classes=0; `forward_features` is its pooled pre-logits
    (forward_head(pre_logits=True)), the map / tokens its unpooled forward_features (NCHW maps,
    NHWC ones permuted; ViT tokens [B, N, D] are returned as tokens and have no map).
    torchvision: the model must have an `avgpool` module (ResNet, RegNet, EfficientNet, ConvNeXt,
    MobileNetV3, ...): the map is avgpool's input, the pooled features its flattened output; the
    classifier never runs. `pool` (map [B, C, h, w] -> [B, C]) replaces either pooling.
    """

    def __init__(self, source: str, model: nn.Module, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.source, self.model, self.pool = source, model, pool
        if source == "torchvision":
            if not isinstance(getattr(model, "avgpool", None), nn.Module):
                raise ValueError(f"torchvision model {type(model).__name__} has no `avgpool` module to cut at; "
                                 "use a ResNet/RegNet/EfficientNet/ConvNeXt/MobileNetV3 or timm:<name>")
            model.avgpool.register_forward_pre_hook(self._stop_hook)
            self._stop = False
            was_training = model.training
            model.eval()
            with torch.no_grad():  # one 64x64 probe gives the channel count
                self.num_features = int(self.forward_feature_map(torch.zeros(1, 3, 64, 64)).shape[1])
            model.train(was_training)
        else:
            self.num_features = int(model.num_features)  # type: ignore[arg-type]

    def _stop_hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self._stop:
            raise _StopAt(args[0])

    def _unpooled(self, x: Tensor) -> Tensor:
        if self.source == "timm":
            out = self.model.forward_features(x)  # type: ignore[operator]
            if out.dim() == 4 and getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                out = out.permute(0, 3, 1, 2)
            return out
        self._stop = True
        try:
            self.model(x)
        except _StopAt as stop:
            return stop.feature_map
        finally:
            self._stop = False
        raise RuntimeError(f"torchvision model {type(self.model).__name__} never called its avgpool")

    def forward_feature_map(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> [B, num_features, h, w]."""
        out = self._unpooled(x)
        if out.dim() != 4:
            raise ValueError(f"{self.source} backbone {type(self.model).__name__} gives tokens {list(out.shape)}, "
                             "not a feature map; use forward_tokens / forward_features")
        return out

    def forward_tokens(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> tokens [B, N, num_features] (N = h * w for CNNs)."""
        out = self._unpooled(x)
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> pooled [B, num_features]."""
        if self.pool is not None:
            return self.pool(self.forward_feature_map(x))
        if self.source == "timm":  # its own layout (NHWC for some models) goes back to its own head
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        return self.model.avgpool(self.forward_feature_map(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not hasattr(self.model, "set_grad_checkpointing"):
            raise ValueError(f"{self.source} model {type(self.model).__name__} has no set_grad_checkpointing")
        self.model.set_grad_checkpointing(enable)  # type: ignore[operator]


def build_external(spec: str, pool: nn.Module | None = None, **kwargs: object) -> ExternalBackbone:
    """"timm:<name>" or "torchvision:<name>" with random weights; kwargs go to the library's constructor."""
    package, _, name = spec.partition(":")
    lib = import_external(package, name)
    if package == "timm":
        model = lib.create_model(name, pretrained=False, num_classes=0, **kwargs)  # type: ignore[attr-defined]
    else:
        model = lib.models.get_model(name, weights=None, **kwargs)  # type: ignore[attr-defined]
    return ExternalBackbone(package, model, pool)


def load_pretrained(model: nn.Module, path: str | Path, ignore_prefixes: Sequence[str] = CLASSIFIER_PREFIXES) -> None:
    """Load a local safetensors state dict by key, strictly (every model key present, shapes equal);
    file keys the model lacks are dropped only when they start with `ignore_prefixes` (a classifier)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_path {path} does not exist; give a local .safetensors file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"pretrained_path {path} is not a safetensors file ({err}); convert it with "
                         "safetensors.torch.save_file(state_dict, ...) (pickled .pth files are never loaded)") from None
    target = model.model if isinstance(model, ExternalBackbone) else model
    own = target.state_dict()
    unexpected = [k for k in state if k not in own and not k.startswith(tuple(ignore_prefixes))]
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items() if k in state
             and state[k].shape != v.shape]
    if unexpected or missing or wrong:
        raise ValueError(f"pretrained_path {path} does not fit {type(target).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape (file vs model) {wrong[:5]}; was it saved from "
                         "the same architecture/stem/width?")
    target.load_state_dict({k: state[k] for k in own}, strict=True)


def build_image_backbone(name: str, *, stem: str | None = None, width: int | None = None,
                         pretrained_path: str | Path | None = None, pool: nn.Module | None = None,
                         **kwargs: object) -> nn.Module:
    """An image backbone by registry name (see the module docstring).

    stem ("cifar" | "imagenet", default "imagenet") and width (default 64) apply to the project's
    ResNets only; other kwargs go to the model's constructor. pretrained_path: a local safetensors file.
    """
    if name.startswith(("timm:", "torchvision:")):
        if stem is not None or width is not None:
            raise ValueError(f"image backbone {name!r}: stem/width apply to resnet18/34/50/101/152 only; "
                             "pass the library's own arguments instead")
        model: nn.Module = build_external(name, pool=pool, **kwargs)
    elif name in IMAGE_BACKBONES:
        try:
            model = IMAGE_BACKBONES[name](stem=stem or "imagenet", width=64 if width is None else width, pool=pool,
                                          **kwargs)
        except TypeError as err:  # an unknown keyword: say which model refused it
            raise TypeError(f"image backbone {name!r}: {err}") from None
    else:
        raise ValueError(f"unknown image backbone {name!r}; known: {', '.join(list_image_backbones())}")
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


@dataclass(kw_only=True)
class ImageModelConfig:
    """model section of the image tasks: an image backbone (forward_features -> [B, num_features])."""

    name: str = "resnet18"
    """resnet18 | resnet34 | resnet50 | resnet101 | resnet152, or timm:<name> / torchvision:<name> where
    those packages import (GPU installs)."""
    stem: Optional[str] = "cifar"
    """Project ResNets: cifar (3x3 conv, stride 1, no max-pool: 32x32 inputs) | imagenet (7x7/2 + max-pool)."""
    width: Optional[int] = 64
    """Project ResNets: channels of the first stage (64 is the published width; smaller for CPU runs)."""
    zero_init_residual: bool = False
    """Project ResNets: zero the last BN gamma of every residual branch (Goyal et al. 2017)."""
    pretrained_path: Optional[str] = None
    """Local safetensors file with backbone weights (never downloaded)."""
    grad_checkpointing: bool = False
    """Recompute block activations in backward (less memory; BN statistics still update once per step)."""


def build_image_model(cfg: ImageModelConfig) -> nn.Module:
    """The backbone of a model section (see ImageModelConfig)."""
    external = cfg.name.startswith(("timm:", "torchvision:"))
    kwargs: dict[str, object] = {} if external or not cfg.zero_init_residual else {"zero_init_residual": True}
    model = build_image_backbone(cfg.name, stem=None if external else cfg.stem, width=None if external else cfg.width,
                                 pretrained_path=cfg.pretrained_path, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
