"""methods.phase_start: a phase with start iteration S is on from step S (at) or from step S + 1
(after), at every place a start iteration is compared: the memory bank, the contrastive loss, the
class weights and ClassMix on the strong views."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memseg_bench.config import Config, config_from_dict
from memseg_bench.methods import memseg, selftrain
from memseg_bench.methods.context import started
from tests.trainers import make_trainer, random_data, tiny_config

START = 3
PHASE_STARTS = ["at", "after"]


def _on(phase_start: str) -> dict[int, bool]:
    """Whether a phase starting at START is on at the steps around it."""
    return {START - 1: False, START: phase_start == "at", START + 1: True}


def test_the_paper_default_is_at_and_the_reference_behaviour_after():
    assert Config().methods.phase_start == "at"
    official = config_from_dict({"methods": {"behaviour": "official"}})
    assert official.methods.phase_start == "after"


def _trainer(method: str, phase_start: str, tmp_path, selftrain_values=None, memseg_values=None):
    config = tiny_config()
    methods = config.methods
    config = dataclasses.replace(
        config,
        methods=dataclasses.replace(
            methods,
            phase_start=phase_start,
            selftrain=dataclasses.replace(methods.selftrain, **(selftrain_values or {})),
            memseg=dataclasses.replace(methods.memseg, **(memseg_values or {})),
        ),
    )
    return make_trainer(method, config, tmp_path)


@pytest.mark.parametrize("phase_start", PHASE_STARTS)
def test_started(phase_start, tmp_path):
    ctx = _trainer("selftrain", phase_start, tmp_path).ctx
    assert {step: started(ctx, step, START) for step in _on(phase_start)} == _on(phase_start)
    assert started(ctx, 1, 0)
    assert started(ctx, 0, 0) == (phase_start == "at")


def _batches():
    data = random_data()
    return next(data.labeled), next(data.unlabeled)


@pytest.mark.parametrize("phase_start", PHASE_STARTS)
def test_memory_bank_and_contrastive_loss_start(phase_start, tmp_path):
    trainer = _trainer(
        "memseg",
        phase_start,
        tmp_path,
        memseg_values={"memory_start": START, "contrastive_start": START},
    )
    labeled, unlabeled = _batches()
    contrastive, memory = {}, {}
    for step in _on(phase_start):
        terms, student = memseg.losses(trainer.ctx, labeled, unlabeled, step)
        contrastive[step] = "contr_lab" in terms and "contr_unlab" in terms
        memory[step] = bool(memseg.update_bank(trainer.ctx, student, step))
    assert contrastive == _on(phase_start)
    assert memory == _on(phase_start)


@pytest.mark.parametrize("phase_start", PHASE_STARTS)
def test_classmix_on_the_views_starts_after_the_ramp(phase_start, tmp_path, monkeypatch):
    trainer = _trainer("selftrain", phase_start, tmp_path, {"ramp_iterations": START})
    probabilities = []
    real = selftrain.classmix

    def recording(*args, prob, **kwargs):
        probabilities.append(prob)
        return real(*args, prob=prob, **kwargs)

    monkeypatch.setattr(selftrain, "classmix", recording)
    _, unlabeled = _batches()
    confidence = torch.rand(unlabeled["label"].shape)
    mixing = {}
    for step in _on(phase_start):
        probabilities.clear()
        selftrain.strong_views(
            trainer.ctx, unlabeled["image"], unlabeled["label"], confidence, step
        )
        mixing[step] = all(p > 0 for p in probabilities)
        assert all(p > 0 for p in probabilities) or all(p == 0 for p in probabilities)
    assert mixing == _on(phase_start)


@pytest.mark.parametrize("counts", ["decayed", "epoch_window"])
@pytest.mark.parametrize("phase_start", PHASE_STARTS)
def test_class_weights_start(phase_start, counts, tmp_path):
    trainer = _trainer(
        "selftrain",
        phase_start,
        tmp_path,
        {"class_weights": True, "class_weights_start": START, "class_counts": counts},
    )
    # One labeled and one unlabeled batch per epoch: the epoch window is full from the first step.
    trainer.ctx.n_labeled = trainer.ctx.n_unlabeled = 2
    labeled, unlabeled = _batches()
    weighted = {}
    for step in _on(phase_start):
        weights = selftrain.class_weights(
            trainer.ctx, labeled, unlabeled["label"], labeled["label"], unlabeled["label"], step
        )
        weighted[step] = weights is not None
    assert weighted == _on(phase_start)
