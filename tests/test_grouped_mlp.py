"""GroupedMLP against a per-group loop of plain layers: outputs, gradients, running statistics;
in both forms, the segmented one (used on GPUs) and the host-split one (used on the CPU)."""

import pytest
import torch
from torch.nn import functional as F

from memseg_bench.models.grouped_mlp import ACTIVATIONS, GroupedMLP, grouped_linear


@pytest.fixture(params=["segmented", "split"])
def random_mlp(request):
    """A maker of GroupedMLPs in one form; each test that takes it runs in both forms."""

    def make(groups, dim=12, out=3, activation="leaky_relu", seed=0):
        torch.manual_seed(seed)
        mlp = GroupedMLP(groups, dim, dim, out, activation, form=request.param).double()
        with torch.no_grad():  # non-trivial running statistics for the single-row path
            mlp.running_mean.uniform_(-1, 1)
            mlp.running_var.uniform_(0.5, 2)
        return mlp

    return make


def reference(mlp: GroupedMLP, x: torch.Tensor, groups: torch.Tensor):
    """Each present group's rows through its own Linear, BatchNorm1d, activation and Linear,
    as nn layers would run them; returns the outputs of the in-range rows and new running stats."""
    out = torch.zeros(x.shape[0], mlp.weight2.shape[1], dtype=x.dtype)
    running_mean, running_var = mlp.running_mean.clone(), mlp.running_var.clone()
    for g in range(mlp.groups):
        rows = groups == g
        if not rows.any():
            continue
        hidden = F.linear(x[rows], mlp.weight1[g], mlp.bias1[g])
        single = int(rows.sum()) == 1
        hidden = F.batch_norm(
            hidden,
            running_mean[g],
            running_var[g],
            mlp.norm_weight[g],
            mlp.norm_bias[g],
            training=mlp.training and not single,
            momentum=mlp.momentum,
            eps=mlp.eps,
        )
        hidden = ACTIVATIONS[mlp.activation](hidden)
        out[rows] = F.linear(hidden, mlp.weight2[g], mlp.bias2[g])
    return out, running_mean, running_var


@pytest.mark.parametrize("groups", [1, 3, 7])
@pytest.mark.parametrize("training", [True, False])
def test_matches_a_loop_over_groups(groups, training, random_mlp):
    mlp = random_mlp(groups).train(training)
    twin = random_mlp(groups).train(training)
    gen = torch.Generator().manual_seed(groups)
    rows = 53
    ids = torch.randint(-1, groups + 1, (rows,), generator=gen)  # -1 and `groups`: left out
    ids[:2] = groups - 1  # the last group has at least two rows
    if groups > 2:
        ids[ids == 1] = 2
        ids[5] = 1  # group 1 is a single row; group 0 may be empty
    x = torch.randn(rows, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = mlp(x, ids)
    expected, running_mean, running_var = reference(twin, x_ref, ids)
    inside = (ids >= 0) & (ids < groups)
    torch.testing.assert_close(out[inside], expected[inside])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(mlp.running_mean, running_mean)
    torch.testing.assert_close(mlp.running_var, running_var)
    weights = torch.randn(rows, 3, generator=gen, dtype=torch.float64) * inside[:, None]
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, param in mlp.named_parameters():
        ref_grad = dict(twin.named_parameters())[name].grad
        torch.testing.assert_close(
            param.grad, torch.zeros_like(param) if ref_grad is None else ref_grad
        )


def test_left_out_rows_change_nothing(random_mlp):
    mlp = random_mlp(4).train()
    x = torch.randn(20, 12, dtype=torch.float64)
    ids = torch.arange(20) % 5  # id 4 is left out
    first = mlp(x, ids)
    moved = x.clone()
    moved[ids == 4] = 1e3 * torch.randn(4, 12, dtype=torch.float64)
    again = mlp(moved, ids)
    torch.testing.assert_close(again[ids < 4], first[ids < 4])


def test_group_statistics_are_per_group_and_absent_groups_untouched(random_mlp):
    mlp = random_mlp(3).train()
    before = mlp.running_mean.clone(), mlp.num_batches_tracked.clone()
    x = torch.randn(10, 12, dtype=torch.float64)
    ids = torch.tensor([0, 2, 0, 2, 0, 2, 2, 0, 2, 0])  # group 1 absent
    scores = mlp(x, ids)
    moved = x.clone()
    moved[ids == 0] = torch.randn(5, 12, dtype=torch.float64)
    again = mlp(moved, ids)
    torch.testing.assert_close(again[ids == 2], scores[ids == 2])
    assert not torch.allclose(again[ids == 0], scores[ids == 0])
    torch.testing.assert_close(mlp.running_mean[1], before[0][1])
    assert not torch.allclose(mlp.running_mean[0], before[0][0])
    assert mlp.num_batches_tracked.tolist() == [2, 0, 2]


@pytest.mark.parametrize("sizes", [[0, 0, 40], [1, 1, 1, 1], [17, 0, 3, 250, 9], [300]])
def test_grouped_linear_any_group_sizes(sizes):
    groups = len(sizes) + 1
    gen = torch.Generator().manual_seed(len(sizes))
    tag = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)] + [torch.full((5,), groups)])
    x = torch.randn(tag.shape[0], 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(groups, 4, 6, generator=gen, dtype=torch.float64)
    bias = torch.randn(groups, 4, generator=gen, dtype=torch.float64)
    out = grouped_linear(x, tag, weight, bias)
    for g in range(groups):
        rows = tag == g
        torch.testing.assert_close(out[rows], x[rows] @ weight[g].T + bias[g])
    assert (out[tag == groups] == 0).all()


def test_forward_blocks_equals_forward_on_the_flattened_rows(random_mlp):
    mlp = random_mlp(3).train()
    twin = random_mlp(3).train()
    x = torch.randn(3, 6, 12, dtype=torch.float64)
    filled = torch.arange(6)[None, :] < torch.tensor([[6], [1], [3]])
    classes = torch.where(filled, torch.arange(3)[:, None], -1)
    torch.testing.assert_close(
        mlp.forward_blocks(x, filled)[filled],
        twin(x.reshape(18, 12), classes.flatten())[filled.flatten()],
    )
    torch.testing.assert_close(mlp.running_var, twin.running_var)
    assert mlp(torch.zeros(0, 12, dtype=torch.float64), torch.zeros(0, dtype=torch.long)).shape == (
        0,
        3,
    )
