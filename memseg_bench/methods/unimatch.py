"""UniMatch (V1): FixMatch with two strong views, each with its own CutMix box, and a
feature-perturbation stream: the weak crop's encoder maps after channel dropout, through the same
decoder, trained against the weak pseudo-labels. Settings: `methods.unimatch`; sources and
differences: docs/controls.md."""

from __future__ import annotations

import torch

from memseg_bench.config import UniMatchConfig
from memseg_bench.methods.context import StepContext, StudentPass
from memseg_bench.methods.fixmatch import (
    pseudo_label_stats,
    step_inputs,
    strong_view,
    strong_view_ce,
    weak_pseudo_labels,
)
from memseg_bench.methods.losses import supervised_ce, thresholded_ce
from memseg_bench.methods.method import Method


def weighted_terms(
    labeled: torch.Tensor,
    strong1: torch.Tensor,
    strong2: torch.Tensor,
    feature: torch.Tensor,
    settings: UniMatchConfig,
) -> dict[str, torch.Tensor]:
    """The loss (L_x + w_s L_s1 + w_s L_s2 + w_fp L_fp) / 2 as its four named, weighted terms."""
    return {
        "sup": labeled / 2,
        "strong1": settings.weight_strong * strong1 / 2,
        "strong2": settings.weight_strong * strong2 / 2,
        "feature": settings.weight_feature * feature / 2,
    }


def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    assert unlabeled is not None
    settings = ctx.config.methods.unimatch
    align_corners = ctx.config.model.align_corners
    images, labels, weak, valid, partner = step_inputs(ctx, labeled, unlabeled)
    with ctx.timer("augment"):
        view1, box1 = strong_view(ctx, weak, settings.strong)
        view2, box2 = strong_view(ctx, weak, settings.strong)
    with ctx.timer("student_forward"):
        net = ctx.model["net"]
        n_labeled = images.shape[0]
        logits, _, perturbed = net.forward_with_perturbed_features(
            torch.cat([images, weak]), settings.feature_dropout
        )
        labeled_logits, confidence, pseudo = weak_pseudo_labels(
            logits, n_labeled, weak.shape[-2:], align_corners
        )
        view_logits, _ = net(torch.cat([view1, view2]))
        logits1, logits2 = view_logits.chunk(2)
        weak_targets = (pseudo, confidence, valid)
        threshold = settings.threshold
        terms = weighted_terms(
            supervised_ce(labeled_logits, labels, align_corners=align_corners),
            strong_view_ce(logits1, box1, weak_targets, partner, threshold, align_corners),
            strong_view_ce(logits2, box2, weak_targets, partner, threshold, align_corners),
            thresholded_ce(perturbed[n_labeled:], *weak_targets, threshold, align_corners),
            settings,
        )
    diagnostics = pseudo_label_stats(
        pseudo, confidence, valid, unlabeled["label"], settings.threshold
    )
    return terms, StudentPass(images, labels, diagnostics=diagnostics)


METHOD = Method(losses=losses, needs_unlabeled=True, section="unimatch")
