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

On the CPU a host read costs nothing and the extra passes over [P, D] of the segmented form do, so
the `split` form splits the rows by group sizes read on the host and runs each group's plain
layers. `form="auto"` (the default) takes `split` on the CPU and `segmented` elsewhere. Both forms
compute the same function; tests check each against a loop over groups, and `memseg bench loss`
times the form a device does not use next to the other.
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
FORMS = ("auto", "split", "segmented")


def _with_empty_group(tensor: torch.Tensor) -> torch.Tensor:
    """Append a zero block for the "left out" id G."""
    return torch.cat([tensor, tensor.new_zeros((1, *tensor.shape[1:]))])


def one_group_linear(group: int):
    """A layer function that puts every row through `group`'s layer."""
    return lambda x, tag, weight, bias: F.linear(x, weight[group], bias[group])


def grouped_linear(x, tag, weight, bias):
    """x [P, I] sorted by tag, tag [P] in 0..G (G: left out), weight [G, O, I], bias [G, O]
    -> [P, O], row p = weight[tag_p] x_p + bias[tag_p] (zero for left-out rows).

    Gathers are index_select and scatters index_add over whole rows or blocks: both directions
    are fast on every device, unlike the accumulating backward of advanced indexing."""
    groups = weight.shape[0]
    rows = x.shape[0]
    if rows == 0:
        return x.new_zeros((0, weight.shape[1]))
    tile = -(-rows // (PIECES_PER_GROUP * groups))
    tiles = -(-rows // tile)
    padded = tiles * tile
    tag = F.pad(tag, (0, padded - rows), value=groups)
    index = torch.arange(padded, device=x.device)
    starts = (index % tile == 0) | (tag != tag.roll(1))
    piece = torch.cumsum(starts, 0) - 1  # non-decreasing piece id of every row
    pieces = torch.arange(tiles + groups, device=x.device)
    first = torch.searchsorted(piece, pieces).clamp(max=padded - 1)  # spare pieces: masked out
    piece_tile = first // tile
    piece_rows = piece_tile[:, None] * tile + torch.arange(tile, device=x.device)  # [S, T]
    mine = (piece[piece_rows] == pieces[:, None])[..., None]
    blocks = x.index_select(0, piece_rows.clamp(max=rows - 1).flatten()).view(len(pieces), tile, -1)
    piece_tag = tag[first]
    weight = _with_empty_group(weight).index_select(0, piece_tag)
    bias = _with_empty_group(bias).index_select(0, piece_tag)
    out = torch.baddbmm(bias[:, None, :], blocks, weight.transpose(1, 2)) * mine  # [S, T, O]
    by_tile = out.new_zeros((tiles, tile, out.shape[-1])).index_add_(0, piece_tile, out)
    return by_tile.view(padded, -1)[:rows]


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
        form: str = "auto",
    ) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.groups, self.activation, self.momentum, self.eps = groups, activation, momentum, eps
        self.form = form
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

    def splits_on(self, device: torch.device) -> bool:
        """Whether this module takes the host-split form on `device`."""
        return self.form == "split" or (self.form == "auto" and device.type == "cpu")

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """x [P, I], groups [P] long -> [P, O]; row p through the MLP of group groups[p]."""
        inside = (groups >= 0) & (groups < self.groups)
        tag = torch.where(inside, groups, torch.full_like(groups, self.groups))
        if self.splits_on(x.device):
            return self._split(x, tag)
        if self.groups == 1:
            return self._layers(x, tag, one_group_linear(0))
        order = torch.argsort(tag, stable=True)
        out = self._layers(x.index_select(0, order), tag[order], grouped_linear)
        return torch.empty_like(out).index_copy(0, order, out)

    def forward_group(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [P, I], every row through the MLP of `group` (plain layers) -> [P, O]."""
        training = self.training and x.shape[0] > 1  # one row: running statistics
        hidden = F.batch_norm(
            F.linear(x, self.weight1[group], self.bias1[group]),
            self.running_mean[group],
            self.running_var[group],
            self.norm_weight[group],
            self.norm_bias[group],
            training=training,
            momentum=self.momentum,
            eps=self.eps,
        )
        if training:
            self.num_batches_tracked[group].add_(1)
        return F.linear(
            ACTIVATIONS[self.activation](hidden), self.weight2[group], self.bias2[group]
        )

    def _split(self, x: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        """The host-read form: each present group's rows through its plain layers."""
        out = None
        for group in range(self.groups):
            rows = tag == group
            if rows.any():
                result = self.forward_group(x[rows], group)
                if out is None:
                    out = result.new_zeros((x.shape[0], result.shape[1]))
                out[rows] = result
        return x.new_zeros((x.shape[0], self.weight2.shape[1])) if out is None else out

    def forward_blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [G, N, I] (block g goes through group g), valid [G, N] bool -> [G, N, O]."""
        groups, size, _ = x.shape
        ids = torch.arange(groups, device=x.device)[:, None].expand(-1, size)
        tag = torch.where(valid, ids, torch.full_like(ids, groups)).flatten()
        if self.splits_on(x.device):
            return self._split(x.flatten(0, 1), tag).view(groups, size, -1)

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
        centred = hidden - _with_empty_group(mean).index_select(0, tag)
        squares = torch.zeros_like(sums).index_add_(0, tag, centred * centred)
        var = squares[:groups] / count.clamp_min(1.0)
        batch = count >= 2 if self.training else torch.zeros_like(count, dtype=torch.bool)
        if self.training:
            self._update_running(batch, mean.detach(), var.detach(), count)
        mean = torch.where(batch, mean, self.running_mean)
        var = torch.where(batch, var, self.running_var)
        scale = self.norm_weight * torch.rsqrt(var + self.eps)
        affine = _with_empty_group(torch.cat([scale, self.norm_bias - mean * scale], dim=1))
        scale, shift = affine.index_select(0, tag).chunk(2, dim=1)
        return torch.addcmul(shift, hidden, scale)

    @torch.no_grad()
    def _update_running(self, batch, mean, var, count) -> None:
        unbiased = var * count / (count - 1).clamp_min(1.0)
        for running, value in ((self.running_mean, mean), (self.running_var, unbiased)):
            moved = (1 - self.momentum) * running + self.momentum * value
            running.copy_(torch.where(batch, moved, running))
        self.num_batches_tracked.add_(batch[:, 0].long())


def set_form(module: nn.Module, form: str) -> None:
    """Put every GroupedMLP inside `module` in `form` (the form is no part of the weights)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    for child in module.modules():
        if isinstance(child, GroupedMLP):
            child.form = form
