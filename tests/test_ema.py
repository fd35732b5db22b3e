"""EMA teacher: the warm-started cosine schedule and the in-place update."""

import copy
import math

import pytest
import torch
from torch import nn

from memseg_bench.methods.ema import ema_alpha, ema_update


def test_schedule_points():
    total = 150_000
    assert ema_alpha(0, total) == 0.0
    assert ema_alpha(1, total) == pytest.approx(1 - 1 / 11)
    assert ema_alpha(1, total) == pytest.approx(0.909, abs=1e-3)
    assert ema_alpha(20, total) == pytest.approx(0.995, abs=1e-6)
    assert ema_alpha(total, total) == pytest.approx(1.0)
    middle = 1 - 0.005 * (math.cos(math.pi / 2) + 1) / 2
    assert ema_alpha(total // 2, total) == pytest.approx(middle)


def test_schedule_is_monotone_and_final_is_used():
    values = [ema_alpha(i, 1000, final=0.99) for i in range(0, 1001, 10)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert ema_alpha(200, 10**6, final=0.99) == pytest.approx(0.99, abs=1e-6)


def test_constant_momentum_keeps_the_horizon_to_the_end():
    total = 320
    assert ema_alpha(total, total, final=0.99, to_one=False) == pytest.approx(0.99)
    assert ema_alpha(total // 2, total, final=0.99, to_one=False) == pytest.approx(0.99)
    assert ema_alpha(1, total, final=0.99, to_one=False) == ema_alpha(1, total, final=0.99)
    assert ema_alpha(total // 2, total, final=0.99) > 0.99


def make_pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
    student.train()
    student(torch.randn(8, 3))  # moves the student's running statistics
    return teacher, student


def test_parameter_update_arithmetic():
    teacher, student = make_pair()
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s.detach())
        assert new.grad is None


@pytest.mark.parametrize("copy_buffers", [True, False])
def test_buffers_copied_or_left(copy_buffers):
    teacher, student = make_pair()
    before = [b.clone() for b in teacher.buffers()]
    ema_update(teacher, student, 0.5, copy_buffers=copy_buffers)
    for old, new, s in zip(before, teacher.buffers(), student.buffers(), strict=True):
        assert not torch.equal(old, s)
        assert torch.equal(new, s if copy_buffers else old)


def test_alpha_zero_copies_student():
    teacher, student = make_pair()
    ema_update(teacher, student, ema_alpha(0, 100))
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(t, s)


@pytest.mark.gpu
def test_cuda_update_has_no_host_sync():
    teacher, student = (m.cuda() for m in make_pair())
    expected = [
        0.8 * t.detach() + 0.2 * s.detach()
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True)
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema_update(teacher, student, 0.8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t, e in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(t, e)
