"""train.freeze_bn decides whether unlabeled crops in the labeled batch's forward change the
labeled images' training: with batch statistics they do, with running statistics they cannot;
and the diagnosis command that measures it."""

from __future__ import annotations

import json

import pytest
import torch

from memseg_bench.bench.unlabeled_forward import CONTROLS
from tests.project import make_project, memseg
from tests.trainers import make_trainer, tiny_config


def _update_of_one_step(control: str, freeze_bn: bool, tmp_path) -> dict:
    # SGD: the update is proportional to the gradient (Adam would turn float-order noise in
    # near-zero gradients into whole steps)
    train = {"freeze_bn": freeze_bn, "optimizer": "sgd", "lr": 0.02}
    config = tiny_config(overrides={"train": train})
    trainer = make_trainer(control, config, tmp_path / control, record=CONTROLS[control])
    for module in trainer.model.modules():  # dropout masks depend on the batch size
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    net = trainer.model["net"]
    before = {k: v.clone() for k, v in net.named_parameters()}
    trainer.train_step()
    return {k: v.detach() - before[k] for k, v in net.named_parameters()}


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_unlabeled_crops_in_the_forward_matter_only_with_batch_statistics(freeze_bn, tmp_path):
    alone = _update_of_one_step("supervised", freeze_bn, tmp_path)
    shared = _update_of_one_step("joint", freeze_bn, tmp_path)
    moved = [k for k in alone if alone[k].abs().max() > 0]
    assert len(moved) > len(alone) // 2
    gap = max(float((alone[k] - shared[k]).abs().max() / alone[k].abs().max()) for k in moved)
    if freeze_bn:
        assert gap < 1e-4  # float rounding of a larger batch only
    else:
        assert gap > 0.1


def test_diagnosis_command_runs_every_control_under_both_statistics(tmp_path):
    project = make_project(tmp_path / "p")
    memseg(project, "prepare")
    out = project / "diagnosis.json"
    args = ["--control", "supervised", "--control", "joint", "--seed", "0", "--threads", "1"]
    result = memseg(project, "bench", "unlabeled-forward", *args, "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["control"], r["freeze_bn"]) for r in rows] == [
        ("supervised", False), ("joint", False), ("supervised", True), ("joint", True)
    ]  # fmt: skip
    assert all(0.0 <= r["val_miou"] <= 100.0 and r["val_curve"] for r in rows)
    assert "running statistics" in result.stdout and "batch statistics" in result.stdout
    bad = memseg(project, "bench", "unlabeled-forward", "--control", "teacher", check=False)
    assert bad.returncode != 0 and "--control must be among" in bad.stderr
