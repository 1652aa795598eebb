"""The BiT ResNet of DPT-Hybrid's R50+ViT-B/16 backbone (Kolesnikov et al. 2020, "Big Transfer"): a ResNet-50 whose
convolutions are weight-standardised and padded like TensorFlow's "SAME", with GroupNorm instead of BatchNorm.

    stem     7x7 conv stride 2 (64) -> GroupNorm + ReLU -> 3x3 max-pool stride 2          (B, 64, H/4, W/4)
    stages   bottleneck blocks; the first block of each stage projects the shortcut (1x1 conv + GroupNorm) and,
             from stage 2 on, halves H and W (stride 2 in its 3x3 conv)                   (B, C_i, H/4 ... H/16, ...)

Module and parameter names are timm's `ResNetV2` (`stem.conv`, `stages.0.blocks.0.downsample.conv`, ...), the names
of the original MiDaS checkpoint, so both weight layouts map onto it (checkpoints/). The numbers are those of timm's
module (tested bit for bit), without importing timm (which alone took ~2 s of a 6 s cold start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": pad so that the output has ceil(size / stride) positions; the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    (top, bottom), (left, right) = same_padding(x.shape[-2], kernel, stride), same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution (Qiao et al. 2019): each output channel's kernel is normalised to zero mean and
    unit variance (biased, eps 1e-8) before convolving, with "SAME" padding (static when the stride is 1)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2 if stride == 1 else 0,
                         bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        # batch_norm over a (1, out, in*k*k) view normalises each output channel's weights (timm's formulation)
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5), then ReLU unless `act=False`."""

    def __init__(self, channels: int, num_groups: int = 32, act: bool = True):
        super().__init__(num_groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x, inplace=True) if self.act else x


class Downsample(nn.Module):
    """The projected shortcut: 1x1 StdConv2d (with the block's stride) + GroupNorm, no activation."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride)
        self.norm = GroupNormAct(out_ch, num_groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def bottleneck_width(out_ch: int, divisor: int = 8) -> int:
    """C/4 rounded to a multiple of 8, at least 8 and not below 90% of C/4 (timm's `make_div`; the official widths
    256, 512, 1024 give exactly C/4)."""
    width = max(divisor, int(out_ch / 4 + divisor / 2) // divisor * divisor)
    return width + divisor if width < 0.9 * out_ch / 4 else width


class Bottleneck(nn.Module):
    """x -> 1x1 (C/4) -> 3x3 (C/4, stride) -> 1x1 (C), GroupNorm (+ReLU) after each; out = ReLU(that + shortcut)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, num_groups: int, project: bool):
        super().__init__()
        mid = bottleneck_width(out_ch)
        self.downsample = Downsample(in_ch, out_ch, stride, num_groups) if project else None
        self.conv1, self.norm1 = StdConv2d(in_ch, mid, 1), GroupNormAct(mid, num_groups)
        self.conv2, self.norm2 = StdConv2d(mid, mid, 3, stride), GroupNormAct(mid, num_groups)
        self.conv3, self.norm3 = StdConv2d(mid, out_ch, 1), GroupNormAct(out_ch, num_groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        h = self.norm3(self.conv3(h))
        return F.relu(h + shortcut, inplace=True)


class Stage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, num_groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1,
                                                 num_groups, project=i == 0) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self, out_ch: int, num_groups: int):
        super().__init__()
        self.conv = StdConv2d(3, out_ch, 7, stride=2)
        self.norm = GroupNormAct(out_ch, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))  # (B, C, H/2, W/2)
        return F.max_pool2d(pad_same(x, 3, 2, value=-math.inf), 3, 2)  # (B, C, H/4, W/4)


class BiTResNet(nn.Module):
    """stem + stages; `forward` is not used by DPT, which reads each stage's output (see dpt.HybridBackbone)."""

    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], stem_width: int, num_groups: int):
        super().__init__()
        self.stem = Stem(stem_width, num_groups)
        ins = (stem_width, *widths[:-1])
        self.stages = nn.ModuleList(Stage(i, o, d, 1 if k == 0 else 2, num_groups)
                                    for k, (i, o, d) in enumerate(zip(ins, widths, depths)))
