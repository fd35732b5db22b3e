"""The knobs behind methods.behaviour: the presets resolve to them, and each knob does what its
values say (both values of every knob shown)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from memseg_bench.config import BEHAVIOURS, Config, config_from_dict, dump_config
from memseg_bench.data.augment import augment, gaussian_blur
from memseg_bench.methods import memseg, selftrain
from memseg_bench.methods.context import labels_at, teacher_forward
from memseg_bench.methods.losses import class_weights_from_counts, epoch_window_class_weights
from memseg_bench.methods.memory_bank import insert, new_bank, pixel_order_when_few
from tests.trainers import NUM_CLASSES, make_trainer, tiny_config


def _knob(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _dotted(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_paper_is_the_defaults_and_official_sets_every_knob_of_its_preset():
    paper = config_from_dict({"methods": {"behaviour": "paper"}})
    assert dataclasses.replace(paper, methods=dataclasses.replace(paper.methods)) == Config()
    official = config_from_dict({"methods": {"behaviour": "official"}})
    knobs = dict(_dotted(BEHAVIOURS["official"]))
    assert len(knobs) >= 12
    for dotted, value in knobs.items():
        assert _knob(official, dotted) == value, dotted
        assert _knob(paper, dotted) != value, dotted
    text = dump_config(official)
    assert "student_forward: separate" in text and "memory_update: before_loss" in text


def test_explicit_knob_values_win_over_the_behaviour():
    config = config_from_dict(
        {"methods": {"behaviour": "official", "selftrain": {"student_forward": "joint"}}}
    )
    assert config.methods.selftrain.student_forward == "joint"
    assert config.methods.selftrain.teacher_mode == "train"  # the rest of the preset stays


def _unlabeled(batch=2, crop=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, crop, crop, generator=g) * 255
    labels = torch.randint(0, NUM_CLASSES, (batch, crop, crop), generator=g)
    return images, labels, torch.rand(batch, crop, crop, generator=g)


@pytest.mark.parametrize("draws", ["per_image", "per_batch"])
def test_the_two_strong_views_of_an_image_get_their_own_draws(draws, tmp_path):
    config = tiny_config(overrides={"train": {"augment": {"draws": draws}}})
    trainer = make_trainer("selftrain", config, tmp_path)
    images, labels, confidence = _unlabeled()
    ramp = config.methods.selftrain.ramp_iterations
    for trial in range(8):
        for step in (0, ramp):  # before the ClassMix ramp and after
            view_images, view_labels, _ = selftrain.strong_views(
                trainer.ctx, images, labels, confidence, step
            )
            assert view_images.shape[0] == 4
            assert not torch.equal(view_images[:2], view_images[2:]), (trial, step)


def test_per_batch_draws_give_each_view_its_own_classmix_decision(tmp_path):
    nothing_but_mix = {"scale_prob": 0.0, "flip_prob": 0.0, "jitter_prob": 0.0}
    nothing_but_mix |= {"blur_prob": 0.0, "classmix_prob": 0.5}
    config = tiny_config(
        overrides={"train": {"augment": {"draws": "per_batch", "unlabeled": nothing_but_mix}}}
    )
    trainer = make_trainer("selftrain", config, tmp_path)
    images, labels, confidence = _unlabeled()
    outcomes = set()
    for _ in range(16):
        views, _, _ = selftrain.strong_views(trainer.ctx, images, labels, confidence, 10**6)
        mixed = tuple(not torch.equal(view, images) for view in (views[:2], views[2:]))
        outcomes.add(mixed)
    assert (True, False) in outcomes and (False, True) in outcomes


BLUR_ONLY = dataclasses.replace(
    Config().train.augment.unlabeled, scale_prob=0.0, flip_prob=0.0, jitter_prob=0.0, blur_prob=1.0
)


def _blur_batch(batch: int, size: int):
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    return images, torch.zeros(batch, size, size, dtype=torch.long)


def test_blur_shape_anisotropic_draws_a_second_sigma():
    images, labels = _blur_batch(2, 24)
    side = BLUR_ONLY

    def blurred(anisotropic: bool):
        generator = torch.Generator().manual_seed(3)
        out = augment(
            images, labels, None, side, (1.0, 1.0), (0.1, 3.0), generator, True, anisotropic
        )
        return out[0]

    isotropic = blurred(False)
    # An isotropic kernel commutes with transposing the image; an anisotropic one does not.
    generator = torch.Generator().manual_seed(3)
    transposed = augment(
        images.transpose(-1, -2), labels, None, side, (1.0, 1.0), (0.1, 3.0), generator, True
    )[0]
    torch.testing.assert_close(transposed.transpose(-1, -2), isotropic, atol=1e-3, rtol=0)
    assert (blurred(True) - isotropic).abs().max() > 0.1


def test_student_forward_separate_keeps_batchnorm_statistics_apart(tmp_path):
    outputs = {}
    for mode in ("joint", "separate"):
        config = tiny_config(overrides={"methods": {"selftrain": {"student_forward": mode}}})
        trainer = make_trainer("selftrain", config, tmp_path / mode)
        net = trainer.ctx.model["net"].train()
        labeled = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
        views = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 255
        torch.manual_seed(0)
        outputs[mode] = selftrain.student_forward(trainer.ctx, labeled, views)
        if mode == "separate":
            torch.manual_seed(0)
            alone_views, _ = net(views)
            alone_labeled, _ = net(labeled)
            torch.testing.assert_close(outputs[mode][2], alone_views)
            torch.testing.assert_close(outputs[mode][0], alone_labeled)
    assert [tuple(t.shape) for t in outputs["joint"]] == [
        tuple(t.shape) for t in outputs["separate"]
    ]
    assert (outputs["joint"][0] - outputs["separate"][0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_mode(mode, tmp_path):
    config = tiny_config(overrides={"methods": {"selftrain": {"teacher_mode": mode}}})
    trainer = make_trainer("selftrain", config, tmp_path)
    teacher_forward(trainer.ctx, torch.rand(2, 3, 32, 32) * 255)
    assert all(m.training == (mode == "train") for m in trainer.ctx.teacher.modules())


@pytest.mark.parametrize("update", ["after_step", "before_loss"])
def test_memory_update_before_the_loss_feeds_the_same_steps_contrastive_term(update, tmp_path):
    config = tiny_config(overrides={"methods": {"memseg": {"memory_update": update}}})
    trainer = make_trainer("memseg", config, tmp_path)
    logs = trainer.train_step()
    assert trainer.ctx.bank["count"].sum() > 0  # filled at step 0 either way
    assert "filter_pass_rate" in logs
    if update == "before_loss":
        assert logs["loss_contr_lab"] > 0
    else:
        assert logs["loss_contr_lab"] == 0  # the bank was still empty at the loss


@pytest.mark.parametrize("selector_input", ["raw", "normalised"])
def test_memory_selector_input(selector_input, tmp_path):
    config = tiny_config(
        overrides={"methods": {"memseg": {"memory_selector_input": selector_input}}}
    )
    trainer = make_trainer("memseg", config, tmp_path)
    ctx = trainer.ctx
    ctx.model.eval()
    bank = new_bank(NUM_CLASSES, 8, config.model.feature_dim)
    rows = torch.randn(NUM_CLASSES, 8, config.model.feature_dim)
    scores = {}
    for scale in (1.0, 5.0):
        ctx.bank = {"features": rows * scale, "count": torch.full_like(bank["count"], 8)}
        with torch.no_grad():
            scores[scale] = memseg.memory_scores(ctx)
    if selector_input == "normalised":
        torch.testing.assert_close(scores[1.0], scores[5.0])
    else:
        assert (scores[1.0] - scores[5.0]).abs().max() > 1e-3


@pytest.mark.parametrize("weights", ["selector", "uniform"])
def test_memory_weights(weights, tmp_path):
    config = tiny_config(overrides={"methods": {"memseg": {"memory_weights": weights}}})
    trainer = make_trainer("memseg", config, tmp_path)
    trainer.ctx.bank["count"].fill_(2)
    scores = memseg.memory_scores(trainer.ctx)
    assert (scores is None) == (weights == "uniform")


def test_few_candidates_enter_in_pixel_order_or_by_rank():
    # Class 0 has 3 candidates (at most k = 4), class 1 has 6 (more than k).
    classes = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1, 1])
    scores = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.3, 0.5, 0.7, 0.6, 0.4])
    features = torch.arange(9, dtype=torch.float32)[:, None].expand(9, 2).clone()
    bank = new_bank(2, 8, 2)

    def stored(keys):
        out = insert(bank, features, classes, keys, k=4, order="highest")
        return [out["features"][c, : out["count"][c], 0].long().tolist() for c in range(2)]

    ranked = stored(scores)
    pixel = stored(pixel_order_when_few(classes, scores, 4, 2, descending=True))
    assert ranked == [[2, 5, 0], [3, 6, 7, 8]]
    assert pixel == [[0, 2, 5], [3, 6, 7, 8]]  # class 1 keeps its 4 best either way
    ascending = pixel_order_when_few(classes, scores, 4, 2, descending=False)
    lowest = insert(bank, features, classes, ascending, k=4, order="lowest")
    assert lowest["features"][0, :3, 0].long().tolist() == [0, 2, 5]
    assert lowest["features"][1, :4, 0].long().tolist() == [1, 4, 8, 7]


def test_quality_resolution_crop_takes_the_argmax_at_crop_size():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 4, 4, generator=g) * 3
    at_features = memseg.teacher_confidence(logits, (4, 4), (16, 16), "features")
    torch.testing.assert_close(at_features[0], logits.softmax(1).max(1).values)
    at_crop = memseg.teacher_confidence(logits, (4, 4), (16, 16), "crop")
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=True).softmax(1)
    confidence, prediction = up.max(1)
    assert torch.equal(at_crop[1], labels_at(prediction, (4, 4)))
    torch.testing.assert_close(at_crop[0], confidence[:, ::4, ::4])
    assert not torch.allclose(at_crop[0], at_features[0])


def test_blur_taps_fixes_the_kernel_size():
    images, labels = _blur_batch(1, 40)
    side = BLUR_ONLY

    def blurred(taps):
        generator = torch.Generator().manual_seed(0)
        return augment(
            images, labels, None, side, (1.0, 1.0), (4.0, 4.0), generator, blur_taps=taps
        )[0]

    expected = gaussian_blur(images, torch.tensor([4.0]), torch.tensor([4.0]), radius=11)
    torch.testing.assert_close(blurred(23), expected)
    assert (blurred(None) - expected).abs().max() > 0.01  # radius 12 by default


def test_epoch_window_class_weights_take_the_median_over_every_class():
    labeled = torch.tensor([[10.0, 0.0, 5.0, 0.0], [30.0, 0.0, 5.0, 0.0]])
    unlabeled = torch.tensor([[20.0, 4.0, 0.0, 0.0], [20.0, 4.0, 10.0, 0.0]])
    got = epoch_window_class_weights(labeled, unlabeled, 0.5)
    freq = torch.tensor([60.0, 4.0, 15.0, 0.0], dtype=torch.float64)
    median = (4.0 + 15.0) / 2  # over all four classes, the unseen one included
    seen = (median / freq[:3]).sqrt()
    expected = torch.cat([seen, seen.max().clamp(min=1.0)[None]]).float()
    torch.testing.assert_close(got, expected)
    # The decayed form's median runs over the seen classes only.
    decayed = class_weights_from_counts(freq.float())
    assert (decayed[:3] - got[:3]).abs().max() > 0.1


def test_class_counts_epoch_window_fixes_the_labeled_epoch_and_slides_the_unlabeled_one(tmp_path):
    overrides = {"methods": {"selftrain": {"class_weights": True}}}
    window = dict(
        overrides, methods={"selftrain": {"class_weights": True, "class_counts": "epoch_window"}}
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=g),
            torch.randint(0, NUM_CLASSES, (2, 8, 8), generator=g),
        )
        for _ in range(5)
    ]
    results = {}
    for name, values in (("decayed", overrides), ("epoch_window", window)):
        trainer = make_trainer("selftrain", tiny_config(overrides=values), tmp_path / name)
        ctx = trainer.ctx
        ctx.n_labeled, ctx.n_unlabeled = 4, 6  # 2 labeled and 3 unlabeled steps per epoch
        results[name] = [
            selftrain.class_weights(ctx, {"label": labels}, pseudo, labels, pseudo, step)
            for step, (labels, pseudo) in enumerate(batches)
        ]
    assert all(w is not None for w in results["decayed"])
    window_weights = results["epoch_window"]
    assert window_weights[0] is None and window_weights[1] is None  # 3 unlabeled steps first

    def counts(t):
        return torch.stack([(t == c).sum() for c in range(NUM_CLASSES)]).double()

    labeled_epoch = sum(counts(batches[i][0]) for i in range(2))
    for step in (2, 4):
        last_unlabeled = sum(counts(batches[i][1]) for i in range(step - 2, step + 1))
        share = (step + 1) / 10**6
        expected = epoch_window_class_weights(labeled_epoch[None], last_unlabeled[None], share)
        torch.testing.assert_close(window_weights[step], expected)


def test_photometric_order():
    images, labels = _blur_batch(4, 32)
    jitter_only = dataclasses.replace(BLUR_ONLY, blur_prob=0.0, jitter_prob=1.0)
    shrink = dataclasses.replace(jitter_only, scale_prob=1.0)

    def run(side, scale_range, last):
        generator = torch.Generator().manual_seed(1)
        return augment(
            images, labels, None, side, scale_range, (0.1, 1.5), generator, photometric_last=last
        )

    # Shrunk images are padded: jitter before the resampling leaves the padding 0, after it not.
    before, padded, _ = run(shrink, (0.5, 0.5), False)
    after, _, _ = run(shrink, (0.5, 0.5), True)
    outside = (padded == 255)[:, None].expand_as(before)
    assert outside.any() and (before[outside] == 0).all()
    assert (after[outside] != 0).any()
    # Flips commute with the jitter: without a scale both orders agree.
    flip = dataclasses.replace(jitter_only, flip_prob=1.0)
    flipped_last, flipped_first = run(flip, (1.0, 1.0), True)[0], run(flip, (1.0, 1.0), False)[0]
    torch.testing.assert_close(flipped_last, flipped_first, atol=1e-3, rtol=0)  # sums' order
