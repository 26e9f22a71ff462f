"""MobileFaceNet (Chen et al. 2018, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices"), following the paper's Table 1 for 112x112 input:

    input       operator                 t   c    n  s     output
    112^2 x 3   conv3x3                  -   64   1  2     56^2 x 64
    56^2 x 64   depthwise conv3x3        -   64   1  1     56^2 x 64
    56^2 x 64   bottleneck               2   64   5  2     28^2 x 64
    28^2 x 64   bottleneck               4   128  1  2     14^2 x 128
    14^2 x 128  bottleneck               2   128  6  1     14^2 x 128
    14^2 x 128  bottleneck               4   128  1  2     7^2 x 128
    7^2 x 128   bottleneck               2   128  2  1     7^2 x 128
    7^2 x 128   conv1x1                  -   512  1  1     7^2 x 512
    7^2 x 512   linear GDConv7x7         -   512  1  1     1^2 x 512
    1^2 x 512   linear conv1x1           -   128  1  1     1^2 x 128  (here: num_features, default 512)

Bottleneck (MobileNetV2 style, expansion t of the input width): conv1x1 -> t*c_in, BN, PReLU;
depthwise conv3x3 (stride s on the first of the n units), BN, PReLU; linear conv1x1 -> c, BN;
identity shortcut when the shape is unchanged. Every non-linearity is PReLU, as in the paper.
The final "linear conv1x1" on the 1x1 map is written as Linear(512, num_features, bias=False) +
BN1d (the same operator). Paper: 0.99M parameters and 221M MAdds with the 128-d output.

Deviations / options: `num_features` defaults to 512 (the paper's 128 is `num_features=128`);
`width_mult` scales every c above except the 512-wide conv1x1/GDC. Insightface's "mbf" model
(quoted at 0.45 GFLOPs) is a different, wider variant (stem 128 channels, fixed expansion widths),
not width_mult=2 of this table; docs/benchmarks.md lists both numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhe_scale.models.checkpointing import checkpoint_module

# (expansion t, output channels c, repeats n, stride s) of the bottleneck rows of Table 1
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1),
)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) + BN (+ PReLU unless act=False, the paper's "linear" layers)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """x [B, in_ch, H, W] -> [B, out_ch, H / stride, W / stride]; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.body = nn.Sequential(conv_bn(in_ch, hidden, 1),
                                  conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, out_ch, 1, act=False))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """images [B, 3, S, S] (S = input_size, normalised) -> embeddings [B, num_features].

    Args:
        num_features: embedding size (paper: 128; default 512 like the other face backbones).
        width_mult: multiplies the channel widths 64 / 128 of Table 1 (1.0 = the paper).
        input_size: image side S, a multiple of 16 (112 for faces); the GDC kernel is S / 16.
    """

    def __init__(self, num_features: int = 512, width_mult: float = 1.0, input_size: int = 112) -> None:
        super().__init__()
        if input_size % 16 != 0:
            raise ValueError(f"MobileFaceNet input_size must be a multiple of 16 (112 for faces), got {input_size}")
        if width_mult <= 0:
            raise ValueError(f"MobileFaceNet width_mult must be > 0, got {width_mult}")
        self.num_features = num_features
        self.input_size = input_size
        self.grad_checkpointing = False
        c0 = max(8, round(64 * width_mult))
        stages: list[nn.Module] = [conv_bn(3, c0, 3, stride=2), conv_bn(c0, c0, 3, groups=c0)]
        in_ch = c0
        for t, c, n, s in BOTTLENECKS:
            out_ch = max(8, round(c * width_mult))
            stages.append(nn.Sequential(*[Bottleneck(in_ch if i == 0 else out_ch, out_ch, t, s if i == 0 else 1)
                                          for i in range(n)]))
            in_ch = out_ch
        stages.append(conv_bn(in_ch, 512, 1))
        self.stages = nn.ModuleList(stages)
        side = input_size // 16
        self.gdc = conv_bn(512, 512, side, groups=512, act=False)
        self.gdc[0].padding = (0, 0)  # a global depthwise conv covers the whole map, no padding
        self.linear = nn.Linear(512, num_features, bias=False)
        self.features = nn.BatchNorm1d(num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.features.weight.is_meta:  # built on the meta device to be counted or sharded: nothing to fill
            return
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage (table row) in backward; BN running stats still update once per step."""
        self.grad_checkpointing = enable

    def forward_features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"MobileFaceNet expects images [B, 3, {self.input_size}, {self.input_size}], got "
                             f"{list(x.shape)}; resize/align faces or build with input_size={x.shape[-1]}")
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_module(stage, x)
            else:
                x = stage(x)
        return self.features(self.linear(self.gdc(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)
