"""The contrastive loss computed the straightforward way: a Python loop over classes, each building
the |F_c| x |M_c| weighted distance matrix. Same definition and signature as
`contrastive.contrastive_loss`; kept as the baseline of the loss benchmark and as a readable
statement of the definition. It synchronises with the host once per class."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def class_distance(
    features: torch.Tensor,
    memory: torch.Tensor,
    feature_scores: torch.Tensor | None,
    memory_scores: torch.Tensor | None,
) -> torch.Tensor:
    """Mean over the |F| x |M| matrix of w_f w_m (1 - cos(f, m)) for one class."""
    f_hat = F.normalize(features, dim=-1)
    m_hat = F.normalize(memory.detach(), dim=-1)
    distances = 1.0 - f_hat @ m_hat.T
    if feature_scores is not None:
        w_f = features.shape[0] * feature_scores / feature_scores.sum()
        distances = distances * w_f[:, None]
    if memory_scores is not None:
        w_m = memory.shape[0] * memory_scores / memory_scores.sum()
        distances = distances * w_m[None, :]
    return distances.mean()


def contrastive_loss_pairwise(
    features: torch.Tensor,
    classes: torch.Tensor,
    memory: torch.Tensor,
    memory_count: torch.Tensor,
    feature_scores: torch.Tensor | None,
    memory_scores: torch.Tensor | None,
    num_classes: int,
) -> torch.Tensor:
    total = features.sum() * 0.0
    counts = memory_count.tolist()
    for c in range(num_classes):
        mask = classes == c
        if int(mask.sum()) < 2 or counts[c] < 2:
            continue
        total = total + class_distance(
            features[mask],
            memory[c, : counts[c]],
            None if feature_scores is None else feature_scores[mask],
            None if memory_scores is None else memory_scores[c, : counts[c]],
        )
    return total / num_classes
