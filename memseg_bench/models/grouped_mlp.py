"""Per-group two-layer MLPs, Linear -> BatchNorm1d -> activation -> Linear, applied to rows that
carry a group id: all groups in one pass, without reading any group size on the host.

Each group has its own weights and its own BatchNorm statistics, computed over that group's rows
only. Rows whose id lies outside 0..G-1 (ignored pixels, empty memory slots) are left out of every
statistic and get unspecified finite outputs. In training mode a group with one row uses its running
statistics (batch statistics of one row are undefined) and a group with no row is left unchanged.

With several groups the layers are segmented matmuls of fixed shape: rows are sorted by group and
cut into tiles of T rows, and every (tile, group) piece is one product of a batched matmul. Sorted
rows change group at most G times, so there are at most ceil(P / T) + G pieces; with
T = ceil(P / (8 G)) that is about 1.125 times the work of one dense layer, whatever the group sizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
}
PIECES_PER_GROUP = 8


def _with_empty_group(tensor: torch.Tensor) -> torch.Tensor:
    """Append a zero block for the "left out" id G."""
    return torch.cat([tensor, tensor.new_zeros((1, *tensor.shape[1:]))])


def one_group_linear(group: int):
    """A layer function that puts every row through `group`'s layer."""
    return lambda x, tag, weight, bias: F.linear(x, weight[group], bias[group])


def grouped_linear(x, tag, weight, bias):
    """x [P, I] sorted by tag, tag [P] in 0..G (G: left out), weight [G, O, I], bias [G, O]
    -> [P, O], row p = weight[tag_p] x_p + bias[tag_p] (zero for left-out rows)."""
    groups = weight.shape[0]
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros((0, weight.shape[1]))
    tile = -(-rows // (PIECES_PER_GROUP * groups))
    tiles = -(-rows // tile)
    padded = tiles * tile
    x = F.pad(x, (0, 0, 0, padded - rows))
    tag = F.pad(tag, (0, padded - rows), value=groups)
    index = torch.arange(padded, device=x.device)
    starts = (index % tile == 0) | (tag != tag.roll(1))
    piece = torch.cumsum(starts, 0) - 1  # non-decreasing piece id of every row
    first = torch.searchsorted(piece, torch.arange(tiles + groups, device=x.device))
    first = first.clamp(max=padded - 1)  # unused pieces compute something no row reads
    piece_tag = tag[first]
    blocks = x.view(tiles, tile, -1)[first // tile]  # [pieces, T, I]
    weight, bias = _with_empty_group(weight)[piece_tag], _with_empty_group(bias)[piece_tag]
    out = torch.baddbmm(bias[:, None, :], blocks, weight.transpose(1, 2))  # [pieces, T, O]
    return out[piece, index % tile][:rows]


class GroupedMLP(nn.Module):
    def __init__(
        self,
        groups: int,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        activation: str = "relu",
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.groups, self.activation, self.momentum, self.eps = groups, activation, momentum, eps
        self.weight1 = nn.Parameter(torch.empty(groups, hidden_dim, in_dim))
        self.bias1 = nn.Parameter(torch.empty(groups, hidden_dim))
        self.norm_weight = nn.Parameter(torch.ones(groups, hidden_dim))
        self.norm_bias = nn.Parameter(torch.zeros(groups, hidden_dim))
        self.weight2 = nn.Parameter(torch.empty(groups, out_dim, hidden_dim))
        self.bias2 = nn.Parameter(torch.empty(groups, out_dim))
        self.register_buffer("running_mean", torch.zeros(groups, hidden_dim))
        self.register_buffer("running_var", torch.ones(groups, hidden_dim))
        self.register_buffer("num_batches_tracked", torch.zeros(groups, dtype=torch.long))
        with torch.no_grad():  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            for weight, bias in ((self.weight1, self.bias1), (self.weight2, self.bias2)):
                bound = 1.0 / math.sqrt(weight.shape[-1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """x [P, I], groups [P] long -> [P, O]; row p through the MLP of group groups[p]."""
        inside = (groups >= 0) & (groups < self.groups)
        tag = torch.where(inside, groups, torch.full_like(groups, self.groups))
        if self.groups == 1:
            return self._layers(x, tag, one_group_linear(0))
        order = torch.argsort(tag, stable=True)
        out = self._layers(x[order], tag[order], grouped_linear)
        return torch.empty_like(out).index_copy(0, order, out)

    def forward_group(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [P, I], every row through the MLP of `group` -> [P, O]."""
        tag = torch.full((x.shape[0],), group, dtype=torch.long, device=x.device)
        return self._layers(x, tag, one_group_linear(group))

    def forward_blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [G, N, I] (block g goes through group g), valid [G, N] bool -> [G, N, O]."""
        groups, size, _ = x.shape
        ids = torch.arange(groups, device=x.device)[:, None].expand(-1, size)
        tag = torch.where(valid, ids, torch.full_like(ids, groups)).flatten()

        def block_linear(rows, tag, weight, bias):
            out = torch.baddbmm(
                bias[:, None, :], rows.view(groups, size, -1), weight.transpose(1, 2)
            )
            return out.flatten(0, 1)

        return self._layers(x.flatten(0, 1), tag, block_linear).view(groups, size, -1)

    def _layers(self, x, tag, linear):
        hidden = self._normalise(linear(x, tag, self.weight1, self.bias1), tag)
        return linear(ACTIVATIONS[self.activation](hidden), tag, self.weight2, self.bias2)

    def _normalise(self, hidden: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        """Per-group BatchNorm1d, in float32 at least; statistics over each group's own rows."""
        groups = self.groups
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
        count = hidden.new_zeros(groups + 1).index_add_(0, tag, torch.ones_like(hidden[:, 0]))
        count = count[:groups, None]
        sums = hidden.new_zeros((groups + 1, hidden.shape[1])).index_add_(0, tag, hidden)
        mean = sums[:groups] / count.clamp_min(1.0)
        centred = hidden - _with_empty_group(mean)[tag]
        squares = torch.zeros_like(sums).index_add_(0, tag, centred * centred)
        var = squares[:groups] / count.clamp_min(1.0)
        batch = count >= 2 if self.training else torch.zeros_like(count, dtype=torch.bool)
        if self.training:
            self._update_running(batch, mean.detach(), var.detach(), count)
        mean = torch.where(batch, mean, self.running_mean)
        var = torch.where(batch, var, self.running_var)
        scale = _with_empty_group(self.norm_weight * torch.rsqrt(var + self.eps))
        return (hidden - _with_empty_group(mean)[tag]) * scale[tag] + _with_empty_group(
            self.norm_bias
        )[tag]

    @torch.no_grad()
    def _update_running(self, batch, mean, var, count) -> None:
        unbiased = var * count / (count - 1).clamp_min(1.0)
        momentum = self.momentum
        self.running_mean.copy_(
            torch.where(
                batch, (1 - momentum) * self.running_mean + momentum * mean, self.running_mean
            )
        )
        self.running_var.copy_(
            torch.where(
                batch, (1 - momentum) * self.running_var + momentum * unbiased, self.running_var
            )
        )
        self.num_batches_tracked.add_(batch[:, 0].long())
