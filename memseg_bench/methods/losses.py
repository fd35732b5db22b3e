"""Pixel losses of the self-training objective: supervised CE, confidence-weighted pseudo-label CE,
normalised entropy, the ramp-up and the Cityscapes class weights. Ignore label 255 everywhere."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.nn import functional as F

from memseg_bench.labels import IGNORE
from memseg_bench.models.resize import resized


def ramp(i: int, ramp_iterations: int = 2000) -> float:
    """exp(-5 (1 - i / R)^2) for i < R, else 1."""
    if ramp_iterations <= 0 or i >= ramp_iterations:
        return 1.0
    return math.exp(-5.0 * (1.0 - i / ramp_iterations) ** 2)


def supervised_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Mean CE over the non-ignored pixels (weighted mean when class weights are given; 0 when
    every pixel is ignored). logits [B, C, h, w] are upsampled bilinearly to labels [B, H, W]."""
    logits = resized(logits, labels.shape[-2:], align_corners=align_corners)
    weight = None if class_weights is None else class_weights.to(logits.dtype)
    per_pixel = F.cross_entropy(
        logits, labels, weight=weight, ignore_index=IGNORE, reduction="none"
    )
    # The mean reduction's denominator, written out so a batch with no labelled pixel gives 0,
    # not NaN (0 / 0).
    valid = labels != IGNORE
    if weight is None:
        denominator = valid.sum().to(per_pixel.dtype)
    else:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        denominator = torch.where(valid, weight[safe], torch.zeros_like(per_pixel)).sum()
    return per_pixel.sum() / denominator.clamp_min(1.0 if weight is None else 1e-12)


def pseudo_label_ce(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    confidence: torch.Tensor,
    power: float = 6.0,
    class_weights: torch.Tensor | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Per-pixel CE weighted by confidence**power, averaged over all pixels of the views.

    Ignored pixels (label 255, e.g. padding) contribute 0 but count in the mean."""
    logits = resized(logits, pseudo_labels.shape[-2:], align_corners=align_corners)
    weight = None if class_weights is None else class_weights.to(logits.dtype)
    per_pixel = F.cross_entropy(
        logits, pseudo_labels, weight=weight, ignore_index=IGNORE, reduction="none"
    )
    return (per_pixel * confidence.to(per_pixel.dtype).pow(power)).mean()


def thresholded_ce(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    confidence: torch.Tensor,
    valid: torch.Tensor,
    threshold: float,
    align_corners: bool = False,
) -> torch.Tensor:
    """FixMatch's unlabeled loss: the CE of the pixels whose pseudo-label confidence is at least
    `threshold`, summed, divided by the number of valid pixels (not crop padding), confident or
    not (0 when none is valid). logits [B, C, h, w] are upsampled to the labels [B, H, W]."""
    logits = resized(logits, pseudo_labels.shape[-2:], align_corners=align_corners)
    per_pixel = F.cross_entropy(logits, pseudo_labels, reduction="none")
    counted = valid & (confidence >= threshold)
    total = torch.where(counted, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / valid.sum().to(per_pixel.dtype).clamp_min(1.0)


def entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    form: Literal["unmasked", "masked", "broadcast"] = "unmasked",
) -> torch.Tensor:
    """Entropy of softmax(logits) over dim 1, divided by log C (so in [0, 1]), averaged over
    every pixel (unmasked), over the pixels whose label [B, H, W] is not ignore (masked; 0 when
    there is none), or the unmasked mean times the batch size (broadcast: what a broadcasting
    slip in the code behind the published numbers computed)."""
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(logits, dim=1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=1) / math.log(max(num_classes, 2))
    if form == "unmasked":
        return entropy.mean()
    if form == "broadcast":
        return entropy.mean() * logits.shape[0]
    if labels is None:
        raise ValueError("the masked entropy needs the labels")
    valid = (labels != IGNORE).to(entropy.dtype)
    return (entropy * valid).sum() / valid.sum().clamp_min(1.0)


def epoch_window_class_weights(
    labeled_rows: torch.Tensor, unlabeled_rows: torch.Tensor, unlabeled_share: float
) -> torch.Tensor:
    """sqrt(median(freq) / freq_c) with freq = the summed labeled rows plus `unlabeled_share`
    times the summed unlabeled rows (rows: per-step class counts [steps, C]), the median over
    every class; a class never counted gets the largest weight (at least 1)."""
    freq = labeled_rows.sum(0).double() + unlabeled_share * unlabeled_rows.sum(0).double()
    weights = torch.quantile(freq, 0.5) / freq
    unseen = freq == 0
    weights = torch.where(unseen, 1.0, weights)
    weights = torch.where(unseen, weights.max(), weights)
    return torch.sqrt(weights).to(torch.float32)


def class_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """sqrt(median(freq) / freq_c), median over the classes seen at least once.

    A class never seen gets the weight of the rarest seen class; no class seen: all ones.
    No host synchronisation (nanquantile instead of boolean indexing)."""
    counts = counts.to(torch.float64)
    total = counts.sum()
    freq = counts / total.clamp_min(1.0)
    seen = counts > 0
    median = torch.nanquantile(torch.where(seen, freq, torch.nan), 0.5)
    rarest = torch.where(seen, freq, torch.inf).min()
    freq = torch.where(seen, freq, rarest)
    weights = torch.sqrt(median / freq)
    weights = torch.where(seen.any(), weights, torch.ones_like(weights))
    return weights.to(torch.float32)
