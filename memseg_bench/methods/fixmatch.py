"""FixMatch, as UniMatch's repository runs it for segmentation: the student's own detached
predictions on the unlabeled crop (from the same train-mode forward as the labeled batch) are the
pseudo-labels of a strongly augmented, CutMixed view of it; pixels under the confidence threshold
get no loss. No teacher. Settings: `methods.fixmatch`; sources and differences: docs/controls.md."""

from __future__ import annotations

import torch

from memseg_bench.config import StrongAugmentConfig
from memseg_bench.data.augment import cutmix_boxes, paste, strong_colour
from memseg_bench.methods.context import (
    StepContext,
    StudentPass,
    confidence_and_labels,
    eval_mode_forward,
)
from memseg_bench.methods.losses import supervised_ce, thresholded_ce
from memseg_bench.methods.method import Method
from memseg_bench.methods.selftrain import pseudo_label_quality
from memseg_bench.methods.supervised import augment_labeled


def partners(batch: torch.Tensor) -> torch.Tensor:
    """Image i's CutMix partner is image (i + 1) mod B of the same unlabeled batch."""
    return torch.roll(batch, shifts=-1, dims=0)


@torch.no_grad()
def partner_targets(ctx: StepContext, weak: torch.Tensor, valid: torch.Tensor):
    """(pseudo-labels, confidence, valid) of each image's CutMix partner, predicted by the
    student in eval mode without gradients."""
    logits, _ = eval_mode_forward(ctx.model["net"], weak)
    confidence, labels = confidence_and_labels(
        logits, weak.shape[-2:], ctx.config.model.align_corners
    )
    return partners(labels), partners(confidence), partners(valid)


def strong_view(ctx: StepContext, weak: torch.Tensor, settings: StrongAugmentConfig):
    """(view, box): the strong colour view of every crop with a CutMix box pasted from its
    partner's strong view (an empty box where CutMix was not drawn)."""
    strong = strong_colour(weak, settings, ctx.generator)
    batch, _, height, width = weak.shape
    box = cutmix_boxes(
        batch,
        height,
        width,
        settings.cutmix_prob,
        settings.cutmix_area,
        settings.cutmix_aspect,
        ctx.generator,
        device=weak.device,
    )
    (view,) = paste(box, (strong,), (partners(strong),))
    return view, box


def pseudo_label_stats(pseudo, confidence, valid, hidden_labels, threshold: float) -> dict:
    """Pixel accuracy and mean confidence against the hidden ground truth (diagnostics only), and
    the share of valid pixels whose confidence reaches the threshold."""
    above = (confidence >= threshold) & valid
    share = above.sum() / valid.sum().clamp(min=1)
    return pseudo_label_quality(pseudo, confidence, hidden_labels) | {"pseudo_above_tau": share}


def step_inputs(ctx: StepContext, labeled: dict, unlabeled: dict):
    """(augmented labeled images, their labels, weak crops, their valid pixels, the CutMix
    partners' targets): what FixMatch and UniMatch prepare before their strong views."""
    weak, valid = unlabeled["image"], unlabeled["valid"]
    with ctx.timer("augment"):
        images, labels = augment_labeled(ctx, labeled)
    with ctx.timer("teacher_forward"):
        partner = partner_targets(ctx, weak, valid)
    return images, labels, weak, valid, partner


def weak_pseudo_labels(logits: torch.Tensor, n_labeled: int, size, align_corners: bool):
    """(labeled logits, confidence, pseudo-labels): the joint forward's logits split into the
    labeled batch's and the weak crops', whose detached softmax at crop size gives the rest."""
    labeled_logits, weak_logits = logits[:n_labeled], logits[n_labeled:]
    confidence, pseudo = confidence_and_labels(weak_logits.detach(), size, align_corners)
    return labeled_logits, confidence, pseudo


def strong_view_ce(view_logits, box, weak_targets, partner, threshold: float, align_corners: bool):
    """The thresholded CE of a strong view against the weak targets (pseudo-labels, confidence,
    valid) with the partner's pasted inside its CutMix box."""
    targets = paste(box, weak_targets, partner)
    return thresholded_ce(view_logits, *targets, threshold, align_corners)


def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    assert unlabeled is not None
    settings = ctx.config.methods.fixmatch
    align_corners = ctx.config.model.align_corners
    images, labels, weak, valid, partner = step_inputs(ctx, labeled, unlabeled)
    with ctx.timer("augment"):
        view, box = strong_view(ctx, weak, settings.strong)
    with ctx.timer("student_forward"):
        net = ctx.model["net"]
        logits, _ = net(torch.cat([images, weak]))
        labeled_logits, confidence, pseudo = weak_pseudo_labels(
            logits, images.shape[0], weak.shape[-2:], align_corners
        )
        view_logits, _ = net(view)
        weak_targets = (pseudo, confidence, valid)
        strong = strong_view_ce(
            view_logits, box, weak_targets, partner, settings.threshold, align_corners
        )
        terms = {
            "sup": 0.5 * supervised_ce(labeled_logits, labels, align_corners=align_corners),
            "strong": 0.5 * strong,
        }
    diagnostics = pseudo_label_stats(
        pseudo, confidence, valid, unlabeled["label"], settings.threshold
    )
    return terms, StudentPass(images, labels, diagnostics=diagnostics)


METHOD = Method(losses=losses, needs_unlabeled=True, section="fixmatch")
