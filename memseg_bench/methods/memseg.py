"""The full method: self-training plus the class-wise memory bank and the weighted pixel
contrastive loss on labeled (ground truth) and unlabeled (pseudo-label) pixels."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from memseg_bench.methods import selftrain
from memseg_bench.methods.context import StepContext, flatten_pixels, labels_at, teacher_forward
from memseg_bench.methods.contrastive import contrastive_loss
from memseg_bench.methods.memory_bank import insert, k_per_class, quality_mask


def rank_order(ctx: StepContext) -> str:
    settings = ctx.config.methods.memseg
    if not settings.ranked_insertion:
        return "random"
    if settings.rank_order == "auto":
        return "lowest" if ctx.official else "highest"
    return settings.rank_order


def memory_scores(ctx: StepContext) -> torch.Tensor | None:
    """S'_c on the filled memory slots; `official` makes every memory weight 1 (S'_c inert)."""
    if ctx.official or not ctx.config.methods.memseg.feature_weights:
        return None
    bank = ctx.bank
    num_classes, size, _ = bank["features"].shape
    filled = torch.arange(size, device=bank["count"].device)[None] < bank["count"][:, None]
    classes = torch.arange(num_classes, device=filled.device)[:, None].expand(-1, size)
    scores = torch.zeros(filled.shape, device=filled.device, dtype=bank["features"].dtype)
    rows = bank["features"][filled]
    if rows.shape[0] > 0:
        scores = scores.masked_scatter(
            filled, ctx.model["heads"]["selectors_memory"](rows, classes[filled]).to(scores.dtype)
        )
    return scores


def pixel_term(ctx: StepContext, features: torch.Tensor, labels: torch.Tensor, mem_scores):
    """Contrastive loss of student pixels (projection then prediction head) against the memory."""
    heads = ctx.model["heads"]
    classes = labels_at(labels, features.shape[-2:]).flatten()
    valid = classes != 255
    pixels = flatten_pixels(features)[valid]
    classes = classes[valid]
    if pixels.shape[0] < 2:
        return features.sum() * 0.0
    embedded = heads["prediction"](heads["projection"](pixels))
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
    terms, extras = selftrain.forward(ctx, labeled, unlabeled, step)
    settings = ctx.config.methods.memseg
    if step < settings.contrastive_start:
        return terms, extras
    with ctx.timer("contrastive"):
        mem_scores = memory_scores(ctx)
        if settings.weight_labeled > 0:
            terms["contr_lab"] = settings.weight_labeled * pixel_term(
                ctx, extras["labeled_features"], extras["labeled_labels"], mem_scores
            )
        if settings.weight_unlabeled > 0:
            terms["contr_unlab"] = settings.weight_unlabeled * pixel_term(
                ctx, extras["view_features"], extras["view_labels"], mem_scores
            )
    return terms, extras


@torch.no_grad()
def bank_candidates(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor):
    """Teacher features of the labeled pixels that pass the quality filter, projected, with their
    classes and the teacher's selector scores (None when insertion is not ranked)."""
    settings = ctx.config.methods.memseg
    logits, features = teacher_forward(ctx, images)
    confidence, prediction = F.softmax(logits.float(), dim=1).max(dim=1)
    labels = labels_at(labels, features.shape[-2:]).flatten()
    keep = quality_mask(
        labels,
        prediction.flatten(),
        confidence.flatten(),
        threshold=settings.quality_threshold,
        enabled=settings.quality_filter,
    )
    classes = labels[keep]
    pixels = flatten_pixels(features)[keep]
    heads = ctx.teacher["heads"]
    dim = ctx.bank["features"].shape[-1]
    ranked = rank_order(ctx) != "random"
    if pixels.shape[0] < 2:  # BatchNorm in a train-mode teacher needs two rows
        projected = pixels.new_zeros((0, dim))
        classes = classes[:0]
        scores = pixels.new_zeros((0,)) if ranked else None
    else:
        projected = heads["projection"](pixels)
        scores = heads["selectors_feature"](projected, classes) if ranked else None
    stats = {"kept": keep.sum(), "valid": (labels != 255).sum()}
    return projected, classes, scores, stats


def update_bank(ctx: StepContext, extras: dict, step: int) -> dict:
    """Insert the best new labeled features of every class, newest first. Returns diagnostics."""
    settings = ctx.config.methods.memseg
    if step < settings.memory_start:
        return {}
    images = extras["labeled_images"]
    projected, classes, scores, stats = bank_candidates(ctx, images, extras["labeled_labels"])
    projected, classes, scores = ctx.gather([projected, classes, scores])
    if projected.shape[0] > 0:
        global_batch = images.shape[0] * ctx.world_size
        k = k_per_class(
            ctx.n_labeled, settings.memory_size, ctx.num_classes, global_batch, settings.k_rule
        )
        ctx.bank = insert(
            ctx.bank,
            projected.to(ctx.bank["features"].dtype),
            classes,
            scores,
            k,
            rank_order(ctx),
            generator=ctx.generator,
        )
    return stats
