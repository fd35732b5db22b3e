"""Training-only pixel heads: projection g, prediction q and the per-class selectors S_c / S'_c."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(in_dim: int, dim: int, out_dim: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), activation, nn.Linear(dim, out_dim)
    )


def _run_mlp(net: nn.Sequential, rows: torch.Tensor) -> torch.Tensor:
    """Apply one selector MLP; a single row in train mode uses the BN's running statistics
    (batch statistics of one row are undefined)."""
    if not (net.training and rows.shape[0] == 1):
        return net(rows)
    linear, norm, activation, last = net
    hidden = F.batch_norm(
        linear(rows),
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        training=False,
        eps=norm.eps,
    )
    return last(activation(hidden))


class ClassSelectors(nn.Module):
    """One scoring MLP per class: Linear -> BN1d -> LeakyReLU(0.2) -> Linear(., 1), then sigmoid.

    BatchNorm statistics are computed per class over that class's rows only.
    """

    def __init__(self, num_classes: int, dim: int = 256) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mlps = nn.ModuleList(mlp(dim, dim, 1, nn.LeakyReLU(0.2)) for _ in range(num_classes))

    def forward(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """x [P, D], classes [P] (long, < num_classes) -> scores [P] in (0, 1)."""
        if x.shape[0] == 0:
            return x.new_zeros((0,))
        order = torch.argsort(classes, stable=True)
        present, counts = torch.unique_consecutive(classes[order], return_counts=True)
        present, counts = present.tolist(), counts.tolist()
        if present[0] < 0 or present[-1] >= self.num_classes:
            raise ValueError(f"class ids must lie in 0..{self.num_classes - 1}, got {present}")
        blocks = torch.split(x[order], counts)
        scores = torch.cat(
            [_run_mlp(self.mlps[c], rows)[:, 0] for c, rows in zip(present, blocks, strict=True)]
        )
        return torch.sigmoid(scores.new_empty(scores.shape).index_copy(0, order, scores))

    def score_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [C, N, D] (row block c scored by class c's MLP) -> scores [C, N]."""
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[:2])
        return torch.sigmoid(
            torch.stack([_run_mlp(net, rows)[:, 0] for net, rows in zip(self.mlps, x, strict=True)])
        )


def build_heads(feature_channels: int, num_classes: int, dim: int = 256) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "projection": mlp(feature_channels, dim, dim, nn.ReLU(inplace=True)),
            "prediction": mlp(dim, dim, dim, nn.ReLU(inplace=True)),
            "selectors_feature": ClassSelectors(num_classes, dim),
            "selectors_memory": ClassSelectors(num_classes, dim),
        }
    )
