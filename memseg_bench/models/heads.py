"""Training-only pixel heads: projection g, prediction q and the per-class selectors S_c / S'_c.

All are GroupedMLPs, so rows that must not count (ignored pixels, empty memory slots) stay in the
tensors and out of the BatchNorm statistics: no boolean selection, no host synchronisation."""

from __future__ import annotations

import torch
from torch import nn

from memseg_bench.models.grouped_mlp import GroupedMLP


def pixel_head(in_dim: int, dim: int, form: str = "auto") -> GroupedMLP:
    """Linear -> BN1d -> ReLU -> Linear on the rows of group 0 (others are left out)."""
    return GroupedMLP(1, in_dim, dim, dim, "relu", form=form)


def group_ids_where(valid: torch.Tensor) -> torch.Tensor:
    """Group ids for a pixel head: 0 where valid, -1 (left out) elsewhere."""
    return valid.long() - 1


class ClassSelectors(nn.Module):
    """One scoring MLP per class: Linear -> BN1d -> LeakyReLU(0.2) -> Linear(., 1), then sigmoid.

    BatchNorm statistics are computed per class over that class's rows only."""

    def __init__(self, num_classes: int, dim: int = 256, form: str = "auto") -> None:
        super().__init__()
        self.mlp = GroupedMLP(num_classes, dim, dim, 1, "leaky_relu", form=form)

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """x [P, D], classes [P] long -> scores [P] in (0, 1); rows with a class outside
        0..C-1 (e.g. 255) are left out of the statistics and their scores are unspecified."""
        return torch.sigmoid(self.mlp(x, classes)[:, 0])

    def score_all(self, x: torch.Tensor, filled: torch.Tensor | None = None) -> torch.Tensor:
        """x [C, N, D] (row block c scored by class c), filled [C, N] (default: all) -> [C, N]."""
        if filled is None:
            filled = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return torch.sigmoid(self.mlp.forward_blocks(x, filled)[..., 0])


def build_heads(
    feature_channels: int, num_classes: int, dim: int = 256, form: str = "auto"
) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "projection": pixel_head(feature_channels, dim, form),
            "prediction": pixel_head(dim, dim, form),
            "selectors_feature": ClassSelectors(num_classes, dim, form),
            "selectors_memory": ClassSelectors(num_classes, dim, form),
        }
    )
