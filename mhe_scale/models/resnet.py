"""ResNet-18/34/50/101/152 (He et al. 2016) for image classification, with the face nets' interface.

    stem "imagenet"  conv7x7(3 -> w, stride 2) - BN - ReLU - maxpool3x3(stride 2)   224 -> 56
    stem "cifar"     conv3x3(3 -> w, stride 1) - BN - ReLU  (no max-pool)            32 -> 32
    layer s          blocks[s] residual blocks, widths w, 2w, 4w, 8w (x4 for Bottleneck);
                     the first block of layers 2-4 has stride 2             ImageNet 56, 28, 14, 7
                                                                            CIFAR    32, 16, 8, 4
    pool             adaptive average pool + flatten (replaceable, e.g. by GeM)

BasicBlock:  out = ReLU(BN(conv3x3(ReLU(BN(conv3x3_stride(x))))) + shortcut(x))
Bottleneck:  out = ReLU(BN(conv1x1_x4(ReLU(BN(conv3x3_stride(ReLU(BN(conv1x1(x))))))))) + shortcut(x))
             (stride on the 3x3 conv: "ResNet v1.5", 4.09 GMACs at 224 for ResNet-50)
shortcut:    identity, or conv1x1(stride) + BN when the shape changes.

No classifier: heads attach to `num_features` (8w, or 32w for Bottleneck). State-dict keys follow
the usual naming (conv1, bn1, layer1..4.i.conv1/bn1/..., downsample.0/1), so ImageNet weights
converted to safetensors load by name (their fc.* keys are dropped; see image.load_pretrained).
Weights: convs Kaiming-normal (fan_out), BN weight 1 / bias 0; `zero_init_residual` sets the
last BN weight of every residual branch to 0, so each block starts as (ReLU of) its shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mhe_scale.models.checkpointing import checkpoint_module

RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}
STEMS = ("cifar", "imagenet")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """x [B, in_ch, H, W] -> [B, planes, H / stride, W / stride] (two 3x3 convs)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(in_ch, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, planes, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """x [B, in_ch, H, W] -> [B, 4 * planes, H / stride, W / stride] (1x1, 3x3 with stride, 1x1)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1, self.bn1 = _conv(in_ch, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, out_ch, 1), nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """images [B, in_chans, H, W] -> pooled features [B, num_features].

    Args:
        block: BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50/101/152).
        layers: blocks per layer, e.g. (3, 4, 6, 3) (see RESNET_LAYERS).
        stem: "imagenet" (7x7 stride 2 + max-pool: /32 overall) or "cifar" (3x3 stride 1: /8 overall).
        width: base channels w (64 in the paper); small values for tests and CPU benchmarks.
        zero_init_residual: zero the last BN weight of every residual branch.
        pool: feature map [B, C, h, w] -> [B, C]; default adaptive average pool + flatten.
        in_chans: input channels.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], *, stem: str = "imagenet",
                 width: int = 64, zero_init_residual: bool = False, pool: nn.Module | None = None,
                 in_chans: int = 3) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"ResNet layers must be 4 positive block counts, e.g. (3, 4, 6, 3); got {layers!r}")
        if stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS}, got {stem!r}")
        if width < 1:
            raise ValueError(f"ResNet width (base channels) must be >= 1, got {width}")
        self.layers, self.stem, self.width, self.in_chans = tuple(int(n) for n in layers), stem, width, in_chans
        self.grad_checkpointing = False
        if stem == "imagenet":
            self.conv1 = _conv(in_chans, width, 7, stride=2)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv(in_chans, width, 3)
            self.maxpool = nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        in_ch = width
        for i, blocks in enumerate(self.layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            units = [block(in_ch, planes, stride)]
            in_ch = planes * block.expansion
            units += [block(in_ch, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*units))
        self.num_features = in_ch
        self.pool = pool if pool is not None else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        if self.conv1.weight.is_meta:  # built on the meta device to be counted: nothing to fill
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in backward; BN running statistics still update once per step."""
        self.grad_checkpointing = enable

    def blocks(self) -> list[nn.Module]:
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def forward_feature_map(self, x: Tensor) -> Tensor:
        """images [B, in_chans, H, W] -> last layer's map [B, num_features, h, w] (h = H/32 imagenet, H/8 cifar)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"ResNet expects images [B, {self.in_chans}, H, W], got {list(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks():
            x = checkpoint_module(block, x) if use_ckpt else block(x)
        return x

    def forward_tokens(self, x: Tensor) -> Tensor:
        """images [B, in_chans, H, W] -> tokens [B, h * w, num_features] (row-major positions)."""
        return self.forward_feature_map(x).flatten(2).transpose(1, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, in_chans, H, W] -> pooled features [B, num_features]."""
        out = self.pool(self.forward_feature_map(x))
        if out.dim() != 2:
            raise ValueError(f"ResNet pool must return [B, C], got {list(out.shape)}; end it with nn.Flatten(1)")
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def resnet(depth: int, **kwargs: object) -> ResNet:
    """ResNet-`depth` (18, 34, 50, 101, 152); kwargs go to ResNet (stem, width, zero_init_residual, pool, in_chans)."""
    if depth not in RESNET_LAYERS:
        raise ValueError(f"unknown ResNet depth {depth}; known: {sorted(RESNET_LAYERS)}")
    block = BasicBlock if depth < 50 else Bottleneck
    return ResNet(block, RESNET_LAYERS[depth], **kwargs)  # type: ignore[arg-type]
