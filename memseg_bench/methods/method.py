"""A method as a record of functions: what the engine calls, and nothing it has to know by name.

The engine streams unlabeled batches when `needs_unlabeled`, builds a teacher when
`needs_teacher`, pixel heads and a memory bank when `new_bank` is
set, calls `losses` for the loss terms of one step, then `update_teacher` and `after_step` after
the optimiser step, and `curve_columns` at every log step. A method reads its own section of
`methods.` in the config plus the shared sections (`train`, `model`, `data`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from memseg_bench.config import Config
    from memseg_bench.methods.context import StepContext, StudentPass

    LossTerms = dict[str, torch.Tensor]
    Losses = Callable[[StepContext, dict, dict | None, int], tuple[LossTerms, StudentPass]]


@dataclass(frozen=True)
class Method:
    # (ctx, labeled batch, unlabeled batch or None, step) -> (named loss terms, student pass)
    losses: Losses
    # An unlabeled batch at every step (the `unlabeled` argument of `losses`).
    needs_unlabeled: bool = False
    # An EMA teacher (a copy of the student).
    needs_teacher: bool = False
    # (config, num_classes, device) -> memory bank; set, the student also gets the pixel heads.
    new_bank: Callable[[Config, int, Any], dict] | None = None
    # (ctx, step) after the optimiser step: move the teacher toward the student.
    update_teacher: Callable[[StepContext, int], None] | None = None
    # (ctx, student pass, step) after the teacher update: extra logs of the step (may be empty).
    after_step: Callable[[StepContext, StudentPass, int], dict] | None = None
    # (ctx, class names) at each log step: (columns of the curve row, per-class row or None).
    curve_columns: Callable[[StepContext, list[str]], tuple[dict, dict | None]] | None = None
    # The section of `methods.` in the config that the method owns, and its ablation variants:
    # variant name -> {dotted config key: value}, e.g. {"methods.memseg.weight_labeled": 0.0}.
    section: str | None = None
    ablations: Mapping[str, dict] = field(default_factory=dict)

    @property
    def needs_bank(self) -> bool:
        return self.new_bank is not None
