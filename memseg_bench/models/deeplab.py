"""DeepLabv3+ and DeepLabv2 heads and the segmenter that wraps backbone, head and normalisation.

Every segmenter takes raw RGB images (float, 0..255, NCHW) and returns (logits, features) at the
feature stride: stride 4 for DeepLabv3+ (256-ch decoder map), the backbone stride for DeepLabv2
(the high-level backbone map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional

from memseg_bench.models.resize import resized

ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
V3PLUS_RATES = (6, 12, 18)  # at output stride 16
V2_RATES = (6, 12, 18, 24)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global average pool -> 1x1 conv-BN-ReLU -> broadcast back to the input's runtime size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(x.mean(dim=(2, 3), keepdim=True))
        # A 1x1 map resized bilinearly is a constant; expand is the exact, export-friendly form.
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    def __init__(self, in_ch: int, rates: Sequence[int], out_ch: int = ASPP_CHANNELS) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_ch, out_ch)]
        branches += [conv_bn_relu(in_ch, out_ch, 3, rate) for rate in rates]
        branches.append(ImagePooling(in_ch, out_ch))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(conv_bn_relu(out_ch * len(branches), out_ch), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3PlusHead(nn.Module):
    def __init__(
        self,
        low_ch: int,
        high_ch: int,
        num_classes: int,
        output_stride: int,
        channels: int = ASPP_CHANNELS,
        init: str = "kaiming",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        rates = [rate * 16 // output_stride for rate in V3PLUS_RATES]
        self.aspp = ASPP(high_ch, rates, channels)
        self.low_project = conv_bn_relu(low_ch, LOW_LEVEL_CHANNELS)
        self.decoder = nn.Sequential(
            conv_bn_relu(channels + LOW_LEVEL_CHANNELS, channels, 3),
            conv_bn_relu(channels, channels, 3),
        )
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.feature_channels = channels
        for module in self.modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if init == "normal":
                nn.init.normal_(module.weight, std=0.01)
            elif module is not self.classifier:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low_project(low)
        context = resized(self.aspp(high), low.shape[-2:], align_corners=self.align_corners)
        features = self.decoder(torch.cat([context, low], dim=1))
        return self.classifier(self.dropout(features)), features


class DeepLabV2Head(nn.Module):
    """Sum of the first `used` dilated 3x3 classifiers on the backbone map (all four by default;
    2 sums only rates 6 and 12, as an early return in the reference does)."""

    def __init__(self, high_ch: int, num_classes: int, used: int = len(V2_RATES)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(high_ch, num_classes, 3, padding=rate, dilation=rate) for rate in V2_RATES
        )
        self.used = used
        self.feature_channels = high_ch
        for branch in self.branches:
            nn.init.normal_(branch.weight, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.branches[0](high)
        for branch in self.branches[1 : self.used]:
            logits = logits + branch(high)
        return logits, high


class Segmenter(nn.Module):
    """Normalisation ((x - mean) / std on 0..255 RGB), backbone, head -> (logits, features).

    `align_corners` is the resize grid the model was built with, for whoever upsamples its
    logits (the exported graph)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.feature_channels = head.feature_channels
        # Not persistent: the normalisation comes from the config, not from a checkpoint.
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's (low-level, high-level) maps of normalised raw images."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(*self.encode(x))

    def forward_with_perturbed_features(
        self, x: torch.Tensor, dropout: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, perturbed logits): the head runs once on the encoder's low- and
        high-level maps and on the same maps after channel dropout (Dropout2d, rate `dropout`),
        as one batch. The dropout acts in training mode only; `forward`, which is what is
        exported, never has it."""
        low, high = self.encode(x)
        drop = functional.dropout2d
        low = torch.cat([low, drop(low, dropout, training=self.training)])
        high = torch.cat([high, drop(high, dropout, training=self.training)])
        logits, features = self.head(low, high)
        clean, perturbed = logits.chunk(2)
        return clean, features[: x.shape[0]], perturbed
