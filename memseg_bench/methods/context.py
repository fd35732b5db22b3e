"""What a method step sees: the models, the memory bank and the settings of one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from memseg_bench.config import Config
from memseg_bench.models.resize import resized
from memseg_bench.timing import PhaseTimer


@dataclass
class StepContext:
    config: Config
    num_classes: int
    n_labeled: int
    model: nn.ModuleDict  # "net": the segmenter, "heads": projection/prediction/selectors (memseg)
    teacher: nn.ModuleDict | None
    bank: dict | None
    generator: torch.Generator  # augmentation randomness, on the training device
    n_unlabeled: int = 0  # images in the unlabeled split (0 without one)
    # Small running state saved in checkpoints (e.g. class counts for class weighting).
    extra_state: dict = field(default_factory=dict)
    # Concatenates per-rank candidate rows in rank order (identity in a single process).
    gather: Callable[[list], list] = lambda tensors: tensors
    world_size: int = 1
    timer: PhaseTimer = field(default_factory=PhaseTimer)


@dataclass(frozen=True)
class StudentPass:
    """What one step's student forward leaves for the method's after-step hook and the logs."""

    labeled_images: torch.Tensor  # the augmented labeled batch the student saw
    labeled_labels: torch.Tensor
    labeled_features: torch.Tensor | None = None
    view_features: torch.Tensor | None = None  # the strong views of the unlabeled batch
    view_labels: torch.Tensor | None = None
    # Logged scalars that are no loss term (e.g. pseudo-label accuracy).
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


def started(ctx: StepContext, step: int, start: int) -> bool:
    """Whether a phase that starts at iteration `start` is on at `step` (0-based): from `start`
    on, or from the step after it (methods.phase_start: at / after)."""
    if ctx.config.methods.phase_start == "after":
        return step > start
    return step >= start


def labels_at(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (B, H, W) class labels to `size`."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].long()


@torch.no_grad()
def teacher_forward(ctx: StepContext, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and features, in the mode methods.selftrain.teacher_mode names."""
    teacher = ctx.teacher
    assert teacher is not None
    teacher.train(ctx.config.methods.selftrain.teacher_mode == "train")
    return teacher["net"](images)


def confidence_and_labels(logits: torch.Tensor, size, align_corners: bool):
    """(max softmax probability, argmax) of logits upsampled bilinearly to `size`, [B, H, W]."""
    probs = torch.softmax(resized(logits.float(), size, align_corners=align_corners), dim=1)
    confidence, labels = probs.max(dim=1)
    return confidence, labels


@torch.no_grad()
def eval_mode_forward(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmenter's (logits, features) in eval mode, without gradients; every module's mode is
    restored afterwards (also BatchNorms that train.freeze_bn keeps in eval mode)."""
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        return net(images)
    finally:
        for module, training in modes:
            module.training = training


def flatten_pixels(features: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) -> (B*h*w, D)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
