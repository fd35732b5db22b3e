"""One training step of every method on CPU: named finite losses, the right parts updated."""

import dataclasses

import pytest
import torch

from tests.trainers import make_trainer, tiny_config


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("supervised", {"loss_sup"}),
        ("selftrain", {"loss_sup", "loss_pseudo", "loss_ent"}),
        ("memseg", {"loss_sup", "loss_pseudo", "loss_ent", "loss_contr_lab", "loss_contr_unlab"}),
    ],
)
def test_one_step_gives_finite_named_losses(method, expected, tmp_path):
    trainer = make_trainer(method, tiny_config(), tmp_path)
    before = snapshot(trainer.model["net"])
    teacher_before = None if trainer.teacher is None else snapshot(trainer.teacher["net"])
    # memseg: fill the bank with one step first, so that the contrastive terms are live
    logs = trainer.train_step()
    if method == "memseg":
        assert int(trainer.ctx.bank["count"].sum()) > 0
        logs = trainer.train_step()
    losses = {k for k in logs if k.startswith("loss_")}
    assert losses == expected
    for key in losses:
        assert torch.isfinite(logs[key]), key
    after = trainer.model["net"].state_dict()
    assert any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )
    if teacher_before is not None:
        teacher_after = trainer.teacher["net"].state_dict()
        changed = [
            k for k in teacher_before if not torch.equal(teacher_before[k], teacher_after[k])
        ]
        assert changed, "the EMA teacher did not move"


def _selector_grads(trainer):
    heads = trainer.model["heads"]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.ctx.bank = trainer.ctx.bank  # keep the filled bank
    labeled = next(trainer.labeled_stream)
    unlabeled = next(trainer.unlabeled_stream)
    terms, _ = trainer.losses(trainer.ctx, labeled, unlabeled, trainer.step)
    sum(terms.values()).backward()

    def norm(module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(sum(g.abs().sum() for g in grads)) if grads else 0.0

    return norm(heads["selectors_feature"]), norm(heads["selectors_memory"])


@pytest.mark.parametrize("behaviour", ["paper", "official"])
def test_selectors_gradients(behaviour, tmp_path):
    trainer = make_trainer("memseg", tiny_config(behaviour), tmp_path)
    trainer.train_step()
    feature, memory = _selector_grads(trainer)
    assert feature > 0
    if behaviour == "paper":
        assert memory > 0
    else:
        assert memory == 0


def test_ablation_without_feature_weights_leaves_selectors_alone(tmp_path):
    config = tiny_config()
    memseg = dataclasses.replace(config.methods.memseg, feature_weights=False)
    config = dataclasses.replace(config, methods=dataclasses.replace(config.methods, memseg=memseg))
    trainer = make_trainer("memseg", config, tmp_path)
    trainer.train_step()
    feature, memory = _selector_grads(trainer)
    assert feature == 0 and memory == 0


def test_bn_momentum_sets_every_segmenter_batchnorm_and_slows_its_statistics(tmp_path):
    config = tiny_config()
    slow = dataclasses.replace(config, train=dataclasses.replace(config.train, bn_momentum=0.01))
    moved = {}
    for name, cfg in (("default", dataclasses.replace(config, train=dataclasses.replace(
            config.train, bn_momentum=None))), ("slow", slow)):  # fmt: skip
        trainer = make_trainer("supervised", cfg, tmp_path / name)
        norms = [
            m
            for m in trainer.model["net"].modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        assert norms and {m.momentum for m in norms} == ({0.1} if name == "default" else {0.01})
        before = norms[0].running_mean.clone()
        trainer.train_step()
        moved[name] = float((norms[0].running_mean - before).abs().max())
    assert 0 < moved["slow"] < moved["default"] / 5
