"""Torchvision backbones that return a stride-4 (low-level) and a dilated high-level feature map.

Module names inside each backbone equal torchvision's, so a torchvision state dict (minus the
classifier) loads into it key for key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memseg_bench.errors import UserError, first_line
from memseg_bench.models.efficientnet_lite import EfficientNetLite0Backbone, packaged_weights_path
from memseg_bench.torchvision_shim import tv_models

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_lite0")
# Keys of the classification heads, ignored when loading backbone weights.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "_fc.")
# `model.weights` values that name weights an installed package ships instead of a file.
PACKAGED_WEIGHTS = {"imagenet": {"efficientnet_lite0": packaged_weights_path}}
MOBILENET_LOW_LEVEL_END = 4  # features[0:4] ends at stride 4 (24 channels)


def _dilate_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one: the conv that used to stride keeps the
    previous dilation (dilation // 2), every other 3x3 conv gets `dilation`."""
    for module in layer.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        was_strided = module.stride == (2, 2)
        if was_strided:
            module.stride = (1, 1)
        if module.kernel_size == (3, 3):
            rate = dilation // 2 if was_strided else dilation
            module.dilation = (rate, rate)
            module.padding = (rate, rate)


def _caffe_layout(net: nn.Module, dilated: dict[str, int]) -> None:
    """The layout of Caffe-trained ResNets (DeepLabv2's COCO weights), same parameters: each
    stage's first bottleneck strides on its 1x1 conv instead of the 3x3, the max-pool rounds its
    output size up, and every 3x3 conv of a dilated stage gets that stage's full dilation."""
    net.maxpool.ceil_mode = True
    for name in ("layer2", "layer3", "layer4"):
        stage = getattr(net, name)
        first = stage[0]
        if hasattr(first, "conv3") and first.conv2.stride == (2, 2):
            first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
        rate = dilated.get(name)
        for conv in stage.modules() if rate is not None else ():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation = conv.padding = (rate, rate)


class ResNetBackbone(nn.Module):
    def __init__(self, name: str, output_stride: int, layout: str = "torchvision") -> None:
        super().__init__()
        net = getattr(tv_models(), name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        dilated = {"layer3": 2, "layer4": 4} if output_stride == 8 else {"layer4": 2}
        for stage, rate in dilated.items():
            _dilate_layer(getattr(self, stage), rate)
        if layout == "caffe":
            _caffe_layout(net, dilated)
        last = net.layer1[-1]
        self.low_channels = (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
        self.high_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


class MobileNetBackbone(nn.Module):
    """MobileNetV3-Large with its last (stride-32) stage dilated: output stride 16."""

    def __init__(self) -> None:
        super().__init__()
        net = tv_models().mobilenet_v3_large(weights=None, dilated=True)
        self.features = net.features
        self.low_channels = self.features[MOBILENET_LOW_LEVEL_END - 1].out_channels
        self.high_channels = self.features[-1].out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = x
        for index, block in enumerate(self.features):
            x = block(x)
            if index == MOBILENET_LOW_LEVEL_END - 1:
                low = x
        return low, x


def build_backbone(name: str, output_stride: int, resnet_layout: str = "torchvision") -> nn.Module:
    if name not in BACKBONES:
        raise UserError(f"params: 'model.backbone' must be one of {list(BACKBONES)}, got {name!r}")
    if output_stride not in (8, 16):
        raise UserError(f"params: 'model.output_stride' must be 8 or 16, got {output_stride}")
    stride_16_only = {
        "mobilenet_v3_large": MobileNetBackbone,
        "efficientnet_lite0": EfficientNetLite0Backbone,
    }
    if name in stride_16_only:
        if output_stride != 16:
            raise UserError(
                f"params: 'model.output_stride' must be 16 for {name}, got {output_stride}"
            )
        return stride_16_only[name]()
    return ResNetBackbone(name, output_stride, resnet_layout)


def _optional(key: str) -> bool:
    # Older torchvision weight files have no BatchNorm step counters.
    return key.endswith("num_batches_tracked")


def weights_file(backbone_name: str, weights: str) -> Path:
    """The file that `model.weights` names: a path, or a key of PACKAGED_WEIGHTS."""
    if weights not in PACKAGED_WEIGHTS:
        return Path(weights)
    shipped = PACKAGED_WEIGHTS[weights]
    if backbone_name not in shipped:
        raise UserError(
            f"params: 'model.weights: {weights}' is packaged only for {sorted(shipped)}; "
            f"give a local weights file for {backbone_name}"
        )
    return Path(shipped[backbone_name]())


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a state dict file (torchvision's or the packaged EfficientNet-Lite0's key names) into
    `backbone`; classifier keys are ignored."""
    path = Path(path)
    where = f"model.weights: {path}"
    if not path.is_file():
        raise UserError(f"model.weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and format errors all mean "not a weights file"
        raise UserError(f"{where} is not a torch state dict file ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{where} is not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    expected = backbone.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"{where} does not fit the backbone: unexpected key '{key}'")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{where} does not fit the backbone: key '{key}' has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    for key in expected:
        if key not in state and not _optional(key):
            raise UserError(f"{where} does not fit the backbone: missing key '{key}'")
    backbone.load_state_dict(state, strict=False)
