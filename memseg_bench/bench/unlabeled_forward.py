"""Diagnosis: what happens to supervised training when unlabeled crops share its forward.

Every control trains the supervised loss alone on the protocol's labeled draw; they differ only in
what else goes through the student in train mode (no loss on it, so any change comes from the
forward itself): nothing, the raw unlabeled crops in the labeled batch's forward, the same crops in
a forward of their own without gradients, or more augmented crops of the labeled images in the
labeled batch's forward (a larger batch of the same images). Each control runs under both values
of `train.freeze_bn` (BatchNorm from batch statistics, or from its running statistics), on the
validation split, last iterate."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from memseg_bench.config import Config
from memseg_bench.errors import UserError
from memseg_bench.fileio import write_json
from memseg_bench.methods.context import StepContext, StudentPass
from memseg_bench.methods.losses import supervised_ce
from memseg_bench.methods.method import Method
from memseg_bench.methods.supervised import METHOD as SUPERVISED
from memseg_bench.methods.supervised import augment_labeled
from memseg_bench.runs import RunSpec


def _sharing_the_forward(extra_images):
    """The supervised loss on the labeled batch, with extra_images(ctx, labeled, unlabeled)
    appended to its train-mode forward (no loss on them)."""

    def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
        images, labels = augment_labeled(ctx, labeled)
        batch = torch.cat([images, extra_images(ctx, labeled, unlabeled)])
        logits, _ = ctx.model["net"](batch)
        align_corners = ctx.config.model.align_corners
        terms = {
            "sup": supervised_ce(logits[: images.shape[0]], labels, align_corners=align_corners)
        }
        return terms, StudentPass(images, labels)

    return losses


def _unlabeled_crops(ctx: StepContext, labeled: dict, unlabeled: dict) -> torch.Tensor:
    return unlabeled["image"]


def _more_labeled_crops(ctx: StepContext, labeled: dict, unlabeled: dict) -> torch.Tensor:
    """As many more augmented crops of the labeled batch as there are unlabeled crops."""
    count = unlabeled["image"].shape[0]
    extra, _ = augment_labeled(ctx, {key: value[:count] for key, value in labeled.items()})
    return extra


def separate(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    """The unlabeled crops in a forward of their own without gradients (they still move the
    BatchNorm running statistics), then the supervised loss on the labeled batch alone."""
    images, labels = augment_labeled(ctx, labeled)
    with torch.no_grad():
        ctx.model["net"](unlabeled["image"])
    logits, _ = ctx.model["net"](images)
    ce = supervised_ce(logits, labels, align_corners=ctx.config.model.align_corners)
    return {"sup": ce}, StudentPass(images, labels)


CONTROLS: dict[str, Method] = {
    "supervised": SUPERVISED,
    "joint": Method(losses=_sharing_the_forward(_unlabeled_crops), needs_unlabeled=True),
    "separate": Method(losses=separate, needs_unlabeled=True),
    "more_labeled": Method(losses=_sharing_the_forward(_more_labeled_crops), needs_unlabeled=True),
}


def run_control(config: Config, control: str, seed: int, runs_dir: Path) -> dict:
    from memseg_bench.engine import Trainer

    n_labeled = min(config.sweep.n_labeled)
    spec = RunSpec(control, config.split.family, n_labeled, seed)
    trainer = Trainer(config, spec, runs_dir, runs_dir, method=CONTROLS[control])
    trainer.fit(progress=False)
    rows = [row for row in trainer.curve.rows if "val_miou" in row]
    return {
        "control": control,
        "freeze_bn": config.train.freeze_bn,
        "seed": seed,
        "n_labeled": n_labeled,
        "val_miou": 100 * rows[-1]["val_miou"],
        "val_curve": {row["step"]: 100 * row["val_miou"] for row in rows},
        "wall_time_s": trainer.elapsed,
    }


def diagnose(
    config: Config, seeds: list[int], controls: list[str], out: Path | None, threads: int
) -> list[dict]:
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise UserError(f"--control must be among {list(CONTROLS)}, got {unknown}")
    if not config.train.val_every:
        raise UserError("params: 'train.val_every' must be set: the diagnosis reads validations")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, threads=threads))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for freeze_bn in (False, True):
            frozen = dataclasses.replace(
                config, train=dataclasses.replace(config.train, freeze_bn=freeze_bn)
            )
            for seed in seeds:
                for control in controls:
                    result = run_control(frozen, control, seed, Path(tmp) / f"{freeze_bn}")
                    results.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "val_curve"}))
                    if out is not None:
                        write_json(out, {"results": results})
    _print_table(results)
    return results


def _print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    seeds = sorted({r["seed"] for r in results})
    table = Table(title="supervised loss only: validation mIoU (%) of the last iterate")
    for column in ["control", "BatchNorm", *[f"draw {s}" for s in seeds]]:
        table.add_column(column)
    keys = dict.fromkeys((r["control"], r["freeze_bn"]) for r in results)
    for control, freeze_bn in keys:
        cells = {r["seed"]: r["val_miou"] for r in results
                 if (r["control"], r["freeze_bn"]) == (control, freeze_bn)}  # fmt: skip
        statistics = "running statistics" if freeze_bn else "batch statistics"
        row = [control, statistics, *[f"{cells[s]:.1f}" if s in cells else "–" for s in seeds]]
        table.add_row(*row)
    Console().print(table)
