"""The full method: self-training plus the class-wise memory bank and the weighted pixel
contrastive loss on labeled (ground truth) and unlabeled (pseudo-label) pixels. It builds on
selftrain and so also reads `methods.selftrain`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.nn import functional as F

from memseg_bench.labels import IGNORE
from memseg_bench.methods import selftrain
from memseg_bench.methods.context import (
    StepContext,
    StudentPass,
    flatten_pixels,
    labels_at,
    started,
    teacher_forward,
)
from memseg_bench.methods.contrastive import contrastive_loss
from memseg_bench.methods.memory_bank import (
    best_per_class,
    insert,
    k_per_class,
    new_bank,
    pixel_order_when_few,
    quality_mask,
    random_keys,
)
from memseg_bench.methods.method import Method
from memseg_bench.models.heads import group_ids_where


def rank_order(ctx: StepContext) -> str:
    settings = ctx.config.methods.memseg
    if not settings.ranked_insertion:
        return "random"
    return settings.rank_order


def memory_scores(ctx: StepContext) -> torch.Tensor | None:
    """S'_c on the filled memory slots, or None (every memory weight 1) when the memory weights
    are uniform."""
    settings = ctx.config.methods.memseg
    if settings.memory_weights == "uniform" or not settings.feature_weights:
        return None
    bank = ctx.bank
    filled = torch.arange(bank["features"].shape[1], device=bank["count"].device)
    filled = filled[None] < bank["count"][:, None]
    rows = bank["features"]
    if settings.memory_selector_input == "normalised":
        rows = F.normalize(rows, dim=-1)
    return ctx.model["heads"]["selectors_memory"].score_all(rows, filled)


def pixel_term(ctx: StepContext, features: torch.Tensor, labels: torch.Tensor, mem_scores):
    """Contrastive loss of student pixels (projection then prediction head) against the memory.
    Ignored pixels stay in the tensors, out of the heads' statistics and of the loss."""
    heads = ctx.model["heads"]
    classes = labels_at(labels, features.shape[-2:]).flatten()
    valid = group_ids_where(classes != IGNORE)
    embedded = heads["prediction"](heads["projection"](flatten_pixels(features), valid), valid)
    scores = None
    if ctx.config.methods.memseg.feature_weights:
        scores = heads["selectors_feature"](embedded.detach(), classes)
    return contrastive_loss(
        embedded,
        classes,
        ctx.bank["features"],
        ctx.bank["count"],
        scores,
        mem_scores,
        ctx.num_classes,
    )


def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    assert unlabeled is not None
    terms, student = selftrain.forward(ctx, labeled, unlabeled, step)
    settings = ctx.config.methods.memseg
    if settings.memory_update == "before_loss":
        student = replace(student, diagnostics=student.diagnostics | bank_step(ctx, student, step))
    if not started(ctx, step, settings.contrastive_start):
        return terms, student
    with ctx.timer("contrastive"):
        mem_scores = memory_scores(ctx)
        if settings.weight_labeled > 0:
            terms["contr_lab"] = settings.weight_labeled * pixel_term(
                ctx, student.labeled_features, student.labeled_labels, mem_scores
            )
        if settings.weight_unlabeled > 0:
            terms["contr_unlab"] = settings.weight_unlabeled * pixel_term(
                ctx, student.view_features, student.view_labels, mem_scores
            )
    return terms, student


def teacher_confidence(logits, feature_size, crop_size, resolution: str):
    """Max probability and argmax of the teacher at feature resolution: computed there
    (features), or at crop size on logits upsampled with align_corners=True and then taken at
    the feature pixels by nearest downsampling (crop)."""
    if resolution == "features":
        return F.softmax(logits.float(), dim=1).max(dim=1)
    logits = F.interpolate(logits.float(), size=crop_size, mode="bilinear", align_corners=True)
    confidence, prediction = F.softmax(logits, dim=1).max(dim=1)
    confidence = F.interpolate(confidence[:, None], size=feature_size, mode="nearest")[:, 0]
    return confidence, labels_at(prediction, feature_size)


@torch.no_grad()
def bank_candidates(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    """Teacher features of every labeled pixel, projected, with their class where the pixel passes
    the quality filter (255 elsewhere) and their ranking keys: the teacher's selector scores, or
    random keys when insertion is not ranked."""
    settings = ctx.config.methods.memseg
    logits, features = teacher_forward(ctx, images)
    confidence, prediction = teacher_confidence(
        logits, features.shape[-2:], images.shape[-2:], settings.quality_resolution
    )
    labels = labels_at(labels, features.shape[-2:]).flatten()
    keep = quality_mask(
        labels,
        prediction.flatten(),
        confidence.flatten(),
        threshold=settings.quality_threshold,
        enabled=settings.quality_filter,
    )
    classes = torch.where(keep, labels, torch.full_like(labels, IGNORE))
    heads = ctx.teacher["heads"]
    projected = heads["projection"](flatten_pixels(features), group_ids_where(keep))
    if rank_order(ctx) == "random":
        keys = random_keys(projected.shape[0], projected, ctx.generator)
    else:
        keys = heads["selectors_feature"](projected, classes)
    stats = {"kept": keep.sum(), "valid": (labels != IGNORE).sum()}
    return projected, classes, keys, stats


def update_bank(ctx: StepContext, student: StudentPass, step: int) -> dict:
    """Insert the best new labeled features of every class, newest first. Returns diagnostics.

    Each rank keeps its k best candidates per class (a fixed C x k rows), the ranks gather them in
    rank order and every rank inserts the same rows into its copy of the bank."""
    settings = ctx.config.methods.memseg
    if not started(ctx, step, settings.memory_start):
        return {}
    images = student.labeled_images
    projected, classes, keys, stats = bank_candidates(ctx, images, student.labeled_labels)
    global_batch = images.shape[0] * ctx.world_size
    k = k_per_class(
        ctx.n_labeled, settings.memory_size, ctx.num_classes, global_batch, settings.k_rule
    )
    order = "highest" if rank_order(ctx) == "highest" else "lowest"
    if settings.few_candidates_order == "pixel":
        keys = pixel_order_when_few(classes, keys, k, ctx.num_classes, order == "highest")
    best = best_per_class(projected, classes, keys, k, ctx.num_classes, order == "highest")
    projected, classes, keys = ctx.gather(list(best))
    ctx.bank = insert(ctx.bank, projected.to(ctx.bank["features"].dtype), classes, keys, k, order)
    return stats


def bank_step(ctx: StepContext, student: StudentPass, step: int) -> dict:
    """The bank update; logs the quality filter's pass rate."""
    with ctx.timer("memory_update"):
        stats = update_bank(ctx, student, step)
    if not stats:
        return {}
    return {"filter_pass_rate": stats["kept"].float() / stats["valid"].clamp(min=1)}


def after_step(ctx: StepContext, student: StudentPass, step: int) -> dict:
    """The bank update after the optimiser and EMA steps (memory_update: after_step)."""
    if ctx.config.methods.memseg.memory_update != "after_step":
        return {}
    return bank_step(ctx, student, step)


def curve_columns(ctx: StepContext, class_names: list[str]) -> tuple[dict, dict]:
    """The bank's fill over all slots, and its row count per class (the .bank.csv curve)."""
    counts = ctx.bank["count"].tolist()
    fill = sum(counts) / (len(counts) * ctx.bank["features"].shape[1])
    return {"bank_fill": fill}, dict(zip(class_names, counts, strict=True))


def make_bank(config, num_classes: int, device) -> dict:
    return new_bank(
        num_classes, config.methods.memseg.memory_size, config.model.feature_dim, device
    )


METHOD = Method(
    losses=losses,
    needs_unlabeled=True,
    needs_teacher=True,
    new_bank=make_bank,
    update_teacher=selftrain.update_teacher,
    after_step=after_step,
    curve_columns=curve_columns,
    section="memseg",
    ablations={
        "no_contr_labeled": {"methods.memseg.weight_labeled": 0.0},
        "no_contr_unlabeled": {"methods.memseg.weight_unlabeled": 0.0},
        "no_feature_weights": {"methods.memseg.feature_weights": False},
        "no_quality_filter": {"methods.memseg.quality_filter": False},
        "random_insertion": {"methods.memseg.ranked_insertion": False},
        # The reference's behaviours that touch every step, one at a time (docs/fidelity.md).
        "separate_forward": {"methods.selftrain.student_forward": "separate"},
        "masked_entropy": {"methods.selftrain.entropy": "masked"},
        "frozen_backbone_bn": {"model.backbone_bn_affine": "frozen"},
    },
)
