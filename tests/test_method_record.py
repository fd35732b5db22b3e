"""A method is a record of hooks: a fourth method, defined here, trains through the engine."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from memseg_bench.methods import METHODS
from memseg_bench.methods.context import StudentPass, teacher_forward
from memseg_bench.methods.losses import supervised_ce
from memseg_bench.methods.method import Method
from memseg_bench.methods.selftrain import update_teacher
from tests.trainers import make_trainer, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def consistency_losses(ctx, labeled, unlabeled, step):
    """Cross-entropy on the labeled batch plus the squared distance to the teacher's
    probabilities on the unlabeled batch (no augmentation)."""
    logits, _ = ctx.model["net"](labeled["image"])
    student, _ = ctx.model["net"](unlabeled["image"])
    target, _ = teacher_forward(ctx, unlabeled["image"])
    gap = (student.softmax(1) - target.softmax(1)).pow(2).mean()
    terms = {"sup": supervised_ce(logits, labeled["label"]), "consistency": gap}
    return terms, StudentPass(labeled["image"], labeled["label"], diagnostics={"gap": gap.detach()})


def count_steps(ctx, student, step):
    ctx.extra_state["steps"] = ctx.extra_state.get("steps", 0) + 1
    return {"labeled_pixels": torch.tensor(float(student.labeled_labels.numel()))}


def steps_column(ctx, class_names):
    return {"hook_steps": ctx.extra_state["steps"]}, None


CONSISTENCY = Method(
    losses=consistency_losses,
    needs_unlabeled=True,
    needs_teacher=True,
    update_teacher=update_teacher,
    after_step=count_steps,
    curve_columns=steps_column,
)


def test_a_method_defined_outside_the_package_trains_through_the_engine(tmp_path):
    assert "consistency" not in METHODS
    config = tiny_config()
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, iterations=4, log_every=2)
    )
    trainer = make_trainer("consistency", config, tmp_path, record=CONSISTENCY)
    assert trainer.teacher is not None and "heads" not in trainer.model
    teacher_before = [p.clone() for p in trainer.teacher.parameters()]
    summary = trainer.fit(progress=False)
    assert summary["steps"] == 4 and trainer.ctx.extra_state["steps"] == 4
    assert any(
        not torch.equal(a, b)
        for a, b in zip(teacher_before, trainer.teacher.parameters(), strict=True)
    )
    with open(tmp_path / "consistency-n20-s0.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [2, 4]
    for column in ("loss_sup", "loss_consistency", "gap", "labeled_pixels", "hook_steps"):
        assert all(row[column] for row in rows), column
    assert [int(row["hook_steps"]) for row in rows] == [2, 4]
    assert not (tmp_path / "consistency-n20-s0.bank.csv").exists()


def test_the_shipped_methods_are_records():
    assert set(METHODS) == {"supervised", "fixmatch", "unimatch", "selftrain", "memseg"}
    assert not METHODS["supervised"].needs_teacher and not METHODS["supervised"].needs_bank
    assert METHODS["selftrain"].needs_teacher and not METHODS["selftrain"].needs_bank
    assert METHODS["memseg"].needs_teacher and METHODS["memseg"].needs_bank
    assert not METHODS["supervised"].needs_unlabeled
    for name in ("fixmatch", "unimatch"):
        control = METHODS[name]
        assert control.needs_unlabeled and not control.needs_teacher and not control.needs_bank
        assert control.section == name


def test_each_ablation_variant_sets_exactly_its_keys():
    from memseg_bench.config import config_to_dict, load_config
    from memseg_bench.methods import METHODS
    from memseg_bench.runs import config_for_run, make_spec

    def flat(values, prefix=""):
        out = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    base = load_config(ROOT / "params.yaml")
    before = flat(config_to_dict(base))
    for name, overrides in METHODS["memseg"].ablations.items():
        after = flat(
            config_to_dict(config_for_run(base, make_spec("memseg", "random", 5, 0, name)))
        )
        changed = {key: after[key] for key in before if after[key] != before[key]}
        assert changed == overrides, name


def test_an_ablation_naming_a_missing_key_fails(monkeypatch):
    from memseg_bench.config import load_config
    from memseg_bench.methods import METHODS
    from memseg_bench.runs import config_for_run, make_spec

    memseg = METHODS["memseg"]
    broken = dataclasses.replace(memseg, ablations={"typo": {"methods.memseg.wieght_labeled": 0.0}})
    monkeypatch.setitem(METHODS, "memseg", broken)
    with pytest.raises(KeyError, match="wieght_labeled"):
        config_for_run(
            load_config(ROOT / "params.yaml"), make_spec("memseg", "random", 5, 0, "typo")
        )
