"""Networks: DeepLabv3+ / DeepLabv2 segmenters on torchvision backbones, and the training heads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from memseg_bench import torchfile
from memseg_bench.config import ModelConfig, stored_config
from memseg_bench.errors import UserError
from memseg_bench.models.backbones import (
    BACKBONES,
    build_backbone,
    load_backbone_weights,
    weights_file,
)
from memseg_bench.models.deeplab import DeepLabV2Head, DeepLabV3PlusHead, Segmenter
from memseg_bench.models.heads import ClassSelectors, build_heads

__all__ = [
    "BACKBONES",
    "ClassSelectors",
    "Segmenter",
    "build_heads",
    "build_segmenter",
    "load_segmenter",
]

MODEL_FILE_KEYS = ("model_state", "config", "class_names", "palette", "config_hash")


def build_segmenter(
    model_cfg: ModelConfig,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """A segmenter taking raw 0..255 RGB NCHW images and returning (logits, features) at the
    feature stride."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    backbone = build_backbone(model_cfg.backbone, model_cfg.output_stride, model_cfg.resnet_layout)
    if model_cfg.weights is not None:
        load_backbone_weights(backbone, weights_file(model_cfg.backbone, model_cfg.weights))
    if model_cfg.backbone_bn_affine == "frozen":
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.requires_grad_(False)
                module.bias.requires_grad_(False)
    if model_cfg.arch == "deeplabv3plus":
        head = DeepLabV3PlusHead(
            backbone.low_channels,
            backbone.high_channels,
            num_classes,
            model_cfg.output_stride,
            model_cfg.decoder_channels,
            model_cfg.head_init,
            model_cfg.align_corners,
        )
    elif model_cfg.arch == "deeplabv2":
        head = DeepLabV2Head(backbone.high_channels, num_classes, used=model_cfg.v2_branches)
    else:
        raise UserError(f"params: 'model.arch' is unknown: {model_cfg.arch!r}")
    return Segmenter(backbone, head, num_classes, mean, std, model_cfg.align_corners)


def load_segmenter(model_file: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained segmenter (eval mode) from a model file written by training.

    Returns (segmenter, info): info holds the file's entries except the weights, with
    info["config"] the resolved Config and info["config_dict"] the plain dict stored in the file.
    Backbone weights are not re-read: the file's state replaces them.
    """
    path = Path(model_file)
    payload = torchfile.load(path, "model file")
    if not isinstance(payload, dict) or any(key not in payload for key in MODEL_FILE_KEYS):
        raise UserError(f"model file {path} lacks one of the entries {list(MODEL_FILE_KEYS)}")
    try:
        config = stored_config(payload["config"])
    except UserError as error:
        raise UserError(f"model file {path}: stored config is invalid: {error}") from None
    # The stored weights replace the backbone init: do not require the original weights file.
    model_cfg = dataclasses.replace(config.model, weights=None)
    segmenter = build_segmenter(
        model_cfg,
        len(payload["class_names"]),
        config.data.mean,
        config.data.std,
    )
    try:
        segmenter.load_state_dict(payload["model_state"], strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"model file {path} does not fit its config: {detail}") from None
    info = {key: value for key, value in payload.items() if key != "model_state"}
    info["config_dict"] = payload["config"]
    info["config"] = config
    return segmenter.eval(), info
