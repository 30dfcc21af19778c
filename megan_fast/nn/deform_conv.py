"""Modulated deformable convolution modules."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from megan_fast.ops.deform_conv import modulated_deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution with its own weight and bias.

    Parameters and initialisation follow ``torchvision.ops.DeformConv2d``
    (kaiming-uniform weight with a = sqrt(5), uniform bias in +-1/sqrt(fan_in)),
    so a state dict of one loads into the other.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size, stride, padding, dilation: int or (h, w) pair.
        groups: convolution groups (must divide both channel counts).
        bias: whether to learn an additive bias.

    Shape:
        input (b, in_channels, h, w), offset (b, 2*og*kh*kw, h_out, w_out),
        mask (b, og*kh*kw, h_out, w_out) or None -> (b, out_channels, h_out, w_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return modulated_deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class DCNPack(ModulatedDeformConv2d):
    """Deformable convolution whose offsets and mask are predicted from a separate feature.

    The form PCD alignment uses (EDVR, Zooming Slow-Mo): a conv ``conv_offset``
    over ``feat`` predicts ``3 * deformable_groups * kh * kw`` channels, split
    into (o1, o2, m); offset = cat(o1, o2), mask = sigmoid(m).  ``conv_offset``
    starts at zero, so a new DCNPack samples the regular grid with mask 0.5.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as :class:`ModulatedDeformConv2d`.
        deformable_groups: offset groups (must divide in_channels).
        offset_in_channels: channels of ``feat`` (default: in_channels).

    Shape:
        x (b, in_channels, h, w), feat (b, offset_in_channels, h, w) -> (b, out_channels, h_out, w_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deformable_groups: int = 8,
        bias: bool = True,
        offset_in_channels: int | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if in_channels % deformable_groups != 0:
            raise ValueError(
                f"in_channels ({in_channels}) must be divisible by deformable_groups ({deformable_groups})"
            )
        self.deformable_groups = deformable_groups
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            offset_in_channels or in_channels,
            3 * deformable_groups * kh * kw,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor, feat: Tensor) -> Tensor:  # type: ignore[override]
        om = self.conv_offset(feat)
        n = om.shape[1] // 3  # (o1, o2, m): offset = cat(o1, o2) is the first two thirds, taken as a view
        offset, m = om.split((2 * n, n), 1)
        mask = torch.sigmoid(m)
        return modulated_deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )
