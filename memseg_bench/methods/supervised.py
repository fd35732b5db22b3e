"""Supervised baseline: weakly augmented labeled batch, cross-entropy."""

from __future__ import annotations

import torch

from memseg_bench.data.augment import augment, classmix
from memseg_bench.methods.context import StepContext, StudentPass
from memseg_bench.methods.losses import supervised_ce
from memseg_bench.methods.method import Method


def augment_labeled(ctx: StepContext, labeled: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix with the ground truth, then scale / flip / weak colour jitter."""
    settings = ctx.config.train.augment
    per_image = settings.draws == "per_image"
    images, labels, _ = classmix(
        labeled["image"],
        labeled["label"],
        None,
        prob=settings.labeled.classmix_prob,
        generator=ctx.generator,
        num_classes=ctx.num_classes,
        drop_background=settings.classmix_drop_background,
        per_image=per_image,
    )
    images, labels, _ = augment(
        images,
        labels,
        None,
        side=settings.labeled,
        scale_range=settings.scale_range,
        blur_sigma=settings.blur_sigma,
        generator=ctx.generator,
        per_image=per_image,
        anisotropic_blur=settings.blur_shape == "anisotropic",
        blur_taps=settings.blur_taps,
        photometric_last=settings.photometric_order == "after_geometry",
    )
    return images, labels


def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    with ctx.timer("augment"):
        images, labels = augment_labeled(ctx, labeled)
    with ctx.timer("student_forward"):
        logits, _ = ctx.model["net"](images)
        terms = {"sup": supervised_ce(logits, labels, align_corners=ctx.config.model.align_corners)}
    return terms, StudentPass(labeled_images=images, labeled_labels=labels)


METHOD = Method(losses=losses)
