"""Mean-teacher EMA: the warm-started cosine schedule and the in-place parameter average."""

from __future__ import annotations

import math

import torch
from torch import nn


def ema_alpha(i: int, total: int, final: float = 0.995, to_one: bool = True) -> float:
    """a_i = min(1 - 1 / (10 i + 1), m_i), m_i a cosine from `final` (i = 0) to 1 (i = total),
    or m_i = `final` throughout when not `to_one`.

    The cosine's horizon 1 / (1 - m_i) grows without bound: over the last half of a run the
    teacher moves less and less and ends as an average of the student's first half.
    """
    total = max(int(total), 1)
    momentum = final
    if to_one:
        momentum = 1.0 - (1.0 - final) * (math.cos(math.pi * min(i, total) / total) + 1.0) / 2.0
    return min(1.0 - 1.0 / (10.0 * i + 1.0), momentum)


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, alpha: float, copy_buffers: bool = True
) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student for every parameter, in place.

    Buffers (BN running statistics, counters) are not averaged: copied from the student when
    `copy_buffers`, else left as they are.
    """
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    if teacher_params:
        torch._foreach_mul_(teacher_params, alpha)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)
    if copy_buffers:
        teacher_buffers = list(teacher.buffers())
        student_buffers = list(student.buffers())
        if len(teacher_buffers) != len(student_buffers):
            raise ValueError("teacher and student have different buffer lists")
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, student_buffers)
