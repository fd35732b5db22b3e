"""Weighted pixel-to-memory contrastive loss in closed form: O(P x D), all classes in one pass.

For class c, with F_c the pixels of class c and M_c the filled memory rows of c,
    L_c = mean_{f in F_c, m in M_c} w_f w_m (1 - f_hat . m_hat)
        = mean_{f in F_c} w_f (mean_m(w_m) - f_hat . mean_m(w_m m_hat)),
so each class needs one weighted memory centroid; no P x N distance matrix is ever built.
L = sum over classes with |F_c| >= 2 and |M_c| >= 2 of L_c, divided by the number of classes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def class_index(classes: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids clamped into range and a mask of in-range pixels (e.g. 255 is left out)."""
    inside = (classes >= 0) & (classes < num_classes)
    return torch.where(inside, classes, torch.zeros_like(classes)), inside


class CentroidCosine(torch.autograd.Function):
    """cos(f_p, centroid[c_p]) * |centroid[c_p]| = f_hat_p . centroid[c_p] for every pixel.

    Written out so the [P, D] features are read twice forward (a thin [P, C] matmul and the row
    norms) and the backward is one gather of scaled centroid rows, one in-place addcmul and one
    [C, P] matmul; the autograd of normalize + gather makes several more full passes over [P, D]."""

    @staticmethod
    def forward(ctx, features, centroid, index):
        dots = (features @ centroid.T).gather(1, index[:, None])[:, 0]
        norms = torch.linalg.vector_norm(features, dim=-1).clamp_min(1e-12)
        cosine = dots / norms
        ctx.save_for_backward(features, centroid, index, norms, cosine)
        return cosine

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return CentroidCosine._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        features, centroid, index, norms, cosine = ctx.saved_tensors
        scale = grad / norms
        grad_features = grad_centroid = None
        if ctx.needs_input_grad[0]:
            # d/df (f . mu / |f|) = mu / |f| - (f . mu / |f|) f / |f|^2. embedding_bag with bags
            # of one writes scale_p * centroid[c_p] in one pass: cheaper than a one-hot [P, C]
            # @ [C, D] matmul, and no [P, D] temporary as with centroid[index] * scale.
            grad_features = F.embedding_bag(
                index[:, None], centroid, per_sample_weights=scale[:, None], mode="sum"
            )
            grad_features.addcmul_(features, (-scale * cosine / norms)[:, None])
        if ctx.needs_input_grad[1]:
            routed = features.new_zeros((features.shape[0], centroid.shape[0]))
            routed.scatter_(1, index[:, None], scale[:, None])
            grad_centroid = routed.T @ features
        return grad_features, grad_centroid, None


def memory_centroids(
    memory: torch.Tensor, memory_count: torch.Tensor, memory_scores: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: mean_m(w_m) [C] and mean_m(w_m m_hat) [C, D] over the filled rows.

    w_m = |M_c| s_m / sum_{M_c} s (all ones when memory_scores is None). The memory is a constant;
    gradients reach memory_scores only."""
    num_classes, size, _ = memory.shape
    memory = F.normalize(memory.detach(), dim=-1)
    filled = torch.arange(size, device=memory.device)[None, :] < memory_count[:, None]
    sizes = filled.sum(dim=1).to(memory.dtype)
    if memory_scores is None:
        weights = filled.to(memory.dtype)
    else:
        scores = memory_scores.to(memory.dtype)
        scores = torch.where(filled, scores, torch.zeros_like(scores))
        totals = scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(memory.dtype).tiny)
        weights = sizes[:, None] * scores / totals
    per_row = sizes.clamp_min(1.0)
    mean_weight = weights.sum(dim=1) / per_row
    centroid = torch.einsum("cn,cnd->cd", weights, memory) / per_row[:, None]
    return mean_weight, centroid


def contrastive_loss(
    features: torch.Tensor,
    classes: torch.Tensor,
    memory: torch.Tensor,
    memory_count: torch.Tensor,
    feature_scores: torch.Tensor | None,
    memory_scores: torch.Tensor | None,
    num_classes: int,
) -> torch.Tensor:
    """features [P, D], classes [P] long (ids outside 0..C-1, e.g. 255, are ignored),
    memory [C, N, D] (first memory_count[c] rows of class c filled), feature_scores [P] or None,
    memory_scores [C, N] or None (None: every weight 1) -> scalar loss. No host synchronisation.

    Computed in float32 at least, with autocast off: sums over 10^5 pixels need the precision."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return _contrastive_loss(
            features, classes, memory, memory_count, feature_scores, memory_scores, num_classes
        )


def _contrastive_loss(
    features, classes, memory, memory_count, feature_scores, memory_scores, num_classes
):
    dtype = torch.promote_types(features.dtype, torch.float32)
    features = features.to(dtype)
    index, inside = class_index(classes, num_classes)
    inside_f = inside.to(dtype)
    if feature_scores is None:
        scores = inside_f
    else:
        scores = torch.where(inside, feature_scores.to(dtype), torch.zeros_like(inside_f))
    sizes = features.new_zeros(num_classes).index_add(0, index, inside_f)
    totals = features.new_zeros(num_classes).index_add(0, index, scores)
    mean_weight, centroid = memory_centroids(
        memory.to(dtype), memory_count, None if memory_scores is None else memory_scores.to(dtype)
    )
    used = (sizes >= 2) & (memory_count.to(sizes.device) >= 2)
    # Since w_f / |F_c| = s_f / sum_{F_c} s sums to 1 over F_c,
    #   L_c = mean_m(w_m) - sum_{F_c} s_f (f_hat . centroid_c) / sum_{F_c} s.
    # Only [P] -> [C] sums run over pixels (no [C] -> [P] gather whose backward would scatter
    # into C slots with heavy atomic collisions on GPUs).
    cosine = CentroidCosine.apply(features, centroid, index)
    pulled = features.new_zeros(num_classes).index_add(0, index, scores * cosine)
    per_class = mean_weight - pulled / totals.clamp_min(torch.finfo(dtype).tiny)
    return torch.where(used, per_class, torch.zeros_like(per_class)).sum() / num_classes
