"""train.reload_best_after (the best-on-val student back after a stall) and
train.bn_recalibration_batches (BatchNorm statistics from unlabeled batches after the last step):
both values of each knob, and an interrupted run with reloads that resumes exactly."""

from __future__ import annotations

import copy
import csv
import dataclasses

import pytest
import torch
from torch import nn

from memseg_bench import checkpoint
from memseg_bench.bn_recalibration import recalibrate_batchnorm
from memseg_bench.data.random_batches import RandomBatches
from memseg_bench.engine import Trainer
from memseg_bench.runs import RunSpec
from tests.trainers import NUM_CLASSES, make_trainer, random_data, tiny_config

# Validation mIoU by step: the best at step 1, never higher afterwards.
SCORES = {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.45, 5: 0.2, 6: 0.4, 7: 0.3, 8: 0.1}


def snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _config(**train):
    config = tiny_config()
    values = {"iterations": 8, "val_every": 1, "log_every": 1} | train
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **values))


def _scripted_validation(monkeypatch, holder: dict) -> None:
    """score_split returns SCORES at the trainer's step and keeps the model it scored."""

    def score_split(segmenter, index, split, config, device, progress=True):
        trainer = holder["trainer"]
        holder.setdefault("validated", {})[trainer.step] = snapshot(trainer.model)
        return {"miou": SCORES[trainer.step]}

    monkeypatch.setattr("memseg_bench.scoring.score_split", score_split)


def _watch_reloads(trainer: Trainer, holder: dict) -> None:
    reload = trainer.reload_best_if_stalled

    def watched():
        moments = copy.deepcopy(trainer.optimizer.state_dict()["state"])
        reload()
        holder.setdefault("after", {})[trainer.step] = (
            snapshot(trainer.model),
            None if trainer.teacher is None else snapshot(trainer.teacher),
            moments,
            copy.deepcopy(trainer.optimizer.state_dict()["state"]),
        )

    trainer.reload_best_if_stalled = watched


def _curve(tmp_path, name="selftrain-n20-s0") -> list[dict]:
    with open(tmp_path / f"{name}.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_stall_longer_than_the_fraction_reloads_the_best_student_and_restarts_the_teacher(
    monkeypatch, tmp_path
):
    holder: dict = {}
    _scripted_validation(monkeypatch, holder)
    # 0.25 x 8 = 2 iterations: the third validation without a higher mIoU reloads (2 is not > 2)
    trainer = make_trainer("selftrain", _config(reload_best_after=0.25), tmp_path)
    holder["trainer"] = trainer
    _watch_reloads(trainer, holder)
    trainer.fit(progress=False)

    rows = _curve(tmp_path)
    reloaded = {
        int(r["step"]): int(r["reloaded_best_step"]) for r in rows if r["reloaded_best_step"]
    }
    assert reloaded == {4: 1, 7: 1}  # the count restarts at a reload; none after the last step
    best = holder["validated"][1]
    for step in (4, 7):
        student, teacher, moments_before, moments_after = holder["after"][step]
        assert_states_equal(student, best)
        assert_states_equal(teacher, best)
        assert moments_before.keys() == moments_after.keys() and moments_before
        for key in moments_before:  # the optimiser goes on with its moments
            assert_states_equal(moments_before[key], moments_after[key])
    stalled = holder["validated"][4]  # what the stalled run had before the reload
    assert any(not torch.equal(stalled[k], best[k]) for k in best if best[k].is_floating_point())
    assert trainer.best_val == {"val_miou": 0.5, "step": 1}


def test_without_the_knob_nothing_is_reloaded(monkeypatch, tmp_path):
    holder: dict = {}
    _scripted_validation(monkeypatch, holder)
    trainer = make_trainer("selftrain", _config(), tmp_path)
    holder["trainer"] = trainer
    _watch_reloads(trainer, holder)
    assert trainer.config.train.reload_best_after is None
    trainer.fit(progress=False)
    assert "after" not in holder and trainer.best_model is None
    assert "reloaded_best_step" not in _curve(tmp_path)[0]
    best, last = holder["validated"][1], snapshot(trainer.model)
    assert any(not torch.equal(last[k], best[k]) for k in best if best[k].is_floating_point())


class Interrupted(Exception):
    pass


def test_a_run_with_reloads_resumes_exactly(monkeypatch, tmp_path):
    config = _config(reload_best_after=0.25, checkpoint_every=1)
    holder: dict = {}
    _scripted_validation(monkeypatch, holder)
    whole = make_trainer("selftrain", config, tmp_path / "a")
    holder["trainer"] = whole
    whole.fit(progress=False)

    broken = make_trainer("selftrain", config, tmp_path / "b")
    holder["trainer"] = broken
    train_step = broken.train_step

    def failing_step():
        if broken.step == 5:  # after the reload at step 4, before the one at step 7
            raise Interrupted
        return train_step()

    broken.train_step = failing_step
    with pytest.raises(Interrupted):
        broken.fit(progress=False)
    stored = checkpoint.load(tmp_path / "b" / "selftrain-n20-s0" / "checkpoint.pt")
    assert stored["step"] == 5 and stored["since_best"] == 1 and stored["best_model"]

    resumed = Trainer(config, RunSpec("selftrain", "test", 20, 0), tmp_path / "b", tmp_path / "b",
                      data=random_data())  # fmt: skip
    holder["trainer"] = resumed
    assert resumed.resume()
    resumed.fit(progress=False)

    assert_states_equal(snapshot(whole.model), snapshot(resumed.model))
    assert_states_equal(snapshot(whole.teacher), snapshot(resumed.teacher))
    columns = ("step", "loss", "val_miou", "reloaded_best_step")
    a, b = _curve(tmp_path / "a"), _curve(tmp_path / "b")
    assert [[r[c] for c in columns] for r in a] == [[r[c] for c in columns] for r in b]
    assert [r["reloaded_best_step"] for r in b if r["reloaded_best_step"]] == ["1", "1"]


def test_reload_best_after_must_be_positive():
    from memseg_bench.config import config_from_dict
    from memseg_bench.errors import UserError

    with pytest.raises(UserError, match="train.reload_best_after"):
        config_from_dict({"train": {"reload_best_after": 0}})
    assert config_from_dict({"train": {"reload_best_after": 1}}).train.reload_best_after == 1.0


# -- BatchNorm recalibration ---------------------------------------------------------------------


def test_recalibration_moves_running_statistics_at_the_layers_momentum_without_touching_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=1.0), nn.ReLU())
    net.eval()
    weights = {k: v.clone() for k, v in net.named_parameters()}
    batches = [torch.randn(2, 3, 8, 8) * (i + 1) + i for i in range(3)]
    assert recalibrate_batchnorm(net, iter(batches)) == 3
    assert not net.training  # the mode it had
    with torch.no_grad():
        last = net[0](batches[-1])
    torch.testing.assert_close(net[1].running_mean, last.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, last.var((0, 2, 3), unbiased=True))
    for name, param in net.named_parameters():
        assert torch.equal(param, weights[name]) and param.grad is None

    slow = nn.BatchNorm2d(3)  # momentum 0.1, statistics not reset first
    recalibrate_batchnorm(slow, [torch.full((2, 3, 4, 4), 10.0)])
    torch.testing.assert_close(slow.running_mean, torch.full((3,), 1.0))


def _model_file(tmp_path, name="selftrain-n20-s0") -> dict:
    return torch.load(tmp_path / name / "model.pt", map_location="cpu", weights_only=True)[
        "model_state"
    ]


@pytest.mark.parametrize("batches", [0, 3])
def test_bn_recalibration_sets_the_written_students_statistics_from_unlabeled_batches(
    batches, tmp_path
):
    config = _config(iterations=2, val_every=0, bn_recalibration_batches=batches, bn_momentum=1.0)
    trainer = make_trainer("selftrain", config, tmp_path)
    before: dict = {}
    finish = trainer.finish

    def watched_finish():
        before["net"] = snapshot(trainer.model["net"])
        before["unlabeled"] = trainer.unlabeled_stream.state()
        before["labeled"] = trainer.labeled_stream.state()
        before["rng"] = torch.get_rng_state()
        return finish()

    trainer.finish = watched_finish
    trainer.fit(progress=False)
    written = _model_file(tmp_path)
    net = trainer.model["net"]
    if batches == 0:
        assert_states_equal(written, before["net"])
        return

    expected = copy.deepcopy(net)
    expected.load_state_dict(before["net"])
    stream = RandomBatches(2, 32, NUM_CLASSES, seed=0)
    stream.load_state(before["unlabeled"])
    torch.set_rng_state(before["rng"])  # the same dropout draws
    expected.train()
    with torch.no_grad():
        for _ in range(batches):
            expected(next(stream)["image"])
    assert_states_equal(written, snapshot(expected))
    changed = [
        k
        for k in written
        if k.endswith("running_mean") and not torch.equal(written[k], before["net"][k])
    ]
    assert changed
    for name, _ in net.named_parameters():
        assert torch.equal(written[name], before["net"][name]), name  # weights stay as trained
    assert trainer.labeled_stream.state()["generator"].equal(before["labeled"]["generator"])
