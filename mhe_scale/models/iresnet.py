"""IResNet: the improved ResNet of ArcFace (Deng et al. 2019) for aligned 112x112 faces.

    stem     conv3x3(3 -> 64, stride 1) - BN - PReLU                        112 x 112
    stage s  IBasicBlock x layers[s], widths 64, 128, 256, 512; the first  56, 28, 14, 7
             block of every stage has stride 2 (and a conv1x1 + BN shortcut)
    head     BN2d - Dropout - flatten - Linear(512 * 7 * 7, num_features) - BN1d ("BN-dropout-FC-BN")

IBasicBlock (pre-activation style, no final activation):
    out = BN(conv3x3_stride(PReLU(BN(conv3x3(BN(x)))))) + shortcut(x)

Depths: r18 [2, 2, 2, 2], r34 [3, 4, 6, 3], r50 [3, 4, 14, 3], r100 [3, 13, 30, 3],
r200 [6, 26, 60, 6]. With the 512-d head r50 has 43.6M parameters and 6.3 GMACs, r100 65.2M and
12.1 GMACs (see docs/benchmarks.md).

Choices written down: the scale (weight) of the final BN1d is fixed at 1 and not trained
(`fix_feature_scale`, as ArcFace's released models do); convolutions are initialised
Kaiming-normal (fan_out) where the ArcFace code uses N(0, 0.1), BN weights 1 and biases 0;
mixed precision is the caller's job (torch.autocast), not a constructor flag.
`input_size` other than 112 (any multiple of 16) only changes the Linear's input width; it exists
so tests can run small images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mhe_scale.models.checkpointing import checkpoint_module

IRESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """x [B, in_ch, H, W] -> [B, out_ch, H / stride, W / stride]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch, eps=BN_EPS))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class IResNet(nn.Module):
    """images [B, 3, S, S] (S = input_size, normalised) -> embeddings [B, num_features].

    Args:
        layers: IBasicBlocks per stage, e.g. (3, 4, 14, 3) for r50 (see IRESNET_LAYERS).
        num_features: embedding size.
        dropout: dropout probability before the Linear of the head.
        input_size: image side S, a multiple of 16 (112 for aligned faces).
        fix_feature_scale: keep the final BN1d's weight at 1, untrained.
    """

    def __init__(self, layers: Sequence[int] = IRESNET_LAYERS[50], num_features: int = 512, dropout: float = 0.0,
                 input_size: int = 112, fix_feature_scale: bool = True) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet layers must be 4 positive block counts, e.g. (3, 4, 14, 3); got {layers!r}")
        if input_size % 16 != 0:
            raise ValueError(f"IResNet input_size must be a multiple of 16 (112 for faces), got {input_size}")
        self.layers = tuple(int(n) for n in layers)
        self.input_size = input_size
        self.num_features = num_features
        self.grad_checkpointing = False
        self.stem = nn.Sequential(conv3x3(3, 64), nn.BatchNorm2d(64, eps=BN_EPS), nn.PReLU(64))
        stages, in_ch = [], 64
        for width, blocks in zip(STAGE_WIDTHS, self.layers):
            units = [IBasicBlock(in_ch, width, stride=2)] + [IBasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*units))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(in_ch, eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        self.reset_parameters()
        if fix_feature_scale:
            self.features.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        if self.features.weight.is_meta:  # built on the meta device to be counted or sharded: nothing to fill
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward (checkpointing.checkpoint_module: BN running statistics
        are still updated once per step, as without checkpointing)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"IResNet expects images [B, 3, {self.input_size}, {self.input_size}], got "
                             f"{list(x.shape)}; resize/align faces or build with input_size={x.shape[-1]}")
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_module(stage, x)
            else:
                x = stage(x)
        x = self.dropout(self.bn2(x)).flatten(1)
        return self.features(self.fc(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
