"""The positive controls' pieces: CutMix boxes and pasting, grayscale and the strong colour
ranges, the thresholded CE, UniMatch's loss composition and its feature perturbation, the
crop-padding mask, and both methods' steps through the engine."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from memseg_bench.config import StrongAugmentConfig, UniMatchConfig, config_from_dict
from memseg_bench.data.augment import (
    cutmix_boxes,
    grayscale,
    jitter_colours,
    paste,
    strong_colour,
)
from memseg_bench.data.loader import pad_and_crop
from memseg_bench.labels import IGNORE
from memseg_bench.methods.losses import thresholded_ce
from memseg_bench.methods.unimatch import weighted_terms
from tests.trainers import make_trainer, tiny_config


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def box_extent(box: torch.Tensor) -> tuple[int, int]:
    rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
    height, width = len(rows), len(cols)
    assert int(box.sum()) == height * width, "the box is not one rectangle"
    return height, width


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_cutmix_boxes_stay_within_area_and_aspect_bounds(height, width):
    area, aspect = (0.02, 0.4), (0.3, 1 / 0.3)
    boxes = cutmix_boxes(2000, height, width, 1.0, area, aspect, gen(0))
    shares, ratios = [], []
    for box in boxes:
        box_h, box_w = box_extent(box)
        # whole pixels: the drawn size is floored, so one row and column of slack below
        assert (box_h + 1) * (box_w + 1) >= area[0] * height * width
        assert box_h * box_w <= area[1] * height * width
        # the drawn h and w lie in [box_h, box_h + 1) and [box_w, box_w + 1)
        assert aspect[0] * box_w < box_h + 1 and box_h < aspect[1] * (box_w + 1)
        shares.append(box_h * box_w / (height * width))
        ratios.append(box_h / box_w)
    # the draws cover the range, not one corner of it
    assert min(shares) < 0.05 and max(shares) > 0.33
    assert min(ratios) < 0.5 and max(ratios) > 2.0
    # positions: boxes touch every border somewhere
    assert bool(boxes[:, 0].any()) and bool(boxes[:, -1].any())
    assert bool(boxes[:, :, 0].any()) and bool(boxes[:, :, -1].any())


def test_cutmix_probability_draws_empty_boxes():
    boxes = cutmix_boxes(4000, 32, 32, 0.5, (0.02, 0.4), (0.3, 1 / 0.3), gen(1))
    drawn = boxes.flatten(1).any(dim=1).float().mean()
    assert abs(float(drawn) - 0.5) < 0.03
    assert not cutmix_boxes(50, 32, 32, 0.0, (0.02, 0.4), (0.3, 3.3), gen(2)).any()


def test_paste_takes_every_pixel_inside_the_box_from_the_partner():
    g = gen(3)
    images = torch.rand(3, 3, 16, 16, generator=g) * 255
    labels = torch.randint(0, 5, (3, 16, 16), generator=g)
    confidence = torch.rand(3, 16, 16, generator=g)
    valid = torch.rand(3, 16, 16, generator=g) > 0.3
    partner = [torch.roll(t, -1, 0) for t in (images, labels, confidence, valid)]
    box = cutmix_boxes(3, 16, 16, 1.0, (0.2, 0.4), (0.5, 2.0), g)
    out = paste(box, (images, labels, confidence, valid), partner)
    for mixed, original, source in zip(
        out, (images, labels, confidence, valid), partner, strict=True
    ):
        inside = box[:, None].expand_as(mixed) if mixed.dim() == 4 else box
        assert torch.equal(mixed[inside], source[inside])
        assert torch.equal(mixed[~inside], original[~inside])


def test_grayscale_is_the_luma_in_every_channel_where_drawn():
    images = torch.rand(2, 3, 4, 4, generator=gen(4)) * 255
    out = grayscale(images, torch.tensor([True, False]))
    luma = 0.299 * images[0, 0] + 0.587 * images[0, 1] + 0.114 * images[0, 2]
    for channel in range(3):
        torch.testing.assert_close(out[0, channel], luma)
    assert torch.equal(out[1], images[1])


def test_jitter_ranges_reach_their_bounds():
    flat = torch.full((1, 3, 2, 2), 100.0)
    neutral = [0.5, 0.5, 0.5]  # contrast, saturation at factor 1, no hue shift

    def brightness(unit):
        units = torch.tensor([[unit, *neutral]])
        return float(jitter_colours(flat, 0.5, 0.5, 0.5, 0.25, units).mean())

    assert brightness(0.0) == pytest.approx(50.0, abs=1e-3)
    assert brightness(1.0) == pytest.approx(150.0, abs=1e-3)
    red = torch.zeros(1, 3, 1, 1)
    red[:, 0] = 200.0
    desaturated = jitter_colours(red, 0.5, 0.5, 0.5, 0.25, torch.tensor([[0.5, 0.5, 0.0, 0.5]]))
    gray = 0.299 * 200.0
    # saturation factor 0.5: half way from the pixel to its luma
    assert float(desaturated[0, 0]) == pytest.approx(gray + 0.5 * (200.0 - gray), abs=0.05)
    # hue +0.25 of the circle: red (hue 0) becomes chartreuse (hue 0.25: g full, r half)
    shifted = jitter_colours(red, 0.5, 0.5, 0.5, 0.25, torch.tensor([[0.5, 0.5, 0.5, 1.0]]))
    r, g, b = (float(v) for v in shifted[0, :, 0, 0])
    assert (r, g, b) == pytest.approx((100.0, 200.0, 0.0), abs=0.05)


def test_strong_colour_applies_each_step_with_its_probability():
    images = torch.rand(400, 3, 8, 8, generator=gen(5)) * 255
    off = StrongAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    assert torch.equal(strong_colour(images, off, gen(6)), images)
    only_gray = dataclasses.replace(off, grayscale_prob=0.2)
    out = strong_colour(images, only_gray, gen(7))
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 0.13 < float(gray.float().mean()) < 0.27
    assert torch.equal(out[~gray], images[~gray])


def test_thresholded_ce_against_a_hand_computed_value():
    # 1 image, 2 classes, 1 x 4 pixels; logits at label resolution (no resize)
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 3.0]], [[0.0, 1.0, 1.0, 0.0]]]])
    labels = torch.tensor([[[0, 1, 1, 0]]])
    confidence = torch.tensor([[[0.97, 0.95, 0.5, 0.99]]])
    valid = torch.tensor([[[True, True, True, False]]])
    # pixel 0 and 1 are confident and valid, pixel 2 below tau, pixel 3 padding
    ce0 = math.log(1 + math.exp(-2.0))
    ce1 = math.log(1 + math.exp(-1.0))
    expected = (ce0 + ce1) / 3  # the three valid pixels, confident or not
    value = thresholded_ce(logits, labels, confidence, valid, threshold=0.95)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    # tau 0 counts pixel 2 too (CE log 2); nothing valid gives 0, not NaN
    with_all = thresholded_ce(logits, labels, confidence, valid, threshold=0.0)
    assert float(with_all) == pytest.approx((ce0 + ce1 + math.log(2)) / 3, rel=1e-6)
    none = thresholded_ce(logits, labels, confidence, torch.zeros_like(valid), threshold=0.0)
    assert float(none) == 0.0


def test_unimatch_terms_compose_with_the_published_weights():
    settings = UniMatchConfig()
    values = [torch.tensor(v) for v in (1.0, 2.0, 3.0, 4.0)]
    terms = weighted_terms(*values, settings)
    assert set(terms) == {"sup", "strong1", "strong2", "feature"}
    total = float(sum(terms.values()))
    assert total == pytest.approx((1.0 + 0.25 * 2.0 + 0.25 * 3.0 + 0.5 * 4.0) / 2)
    assert (settings.weight_strong, settings.weight_feature) == (0.25, 0.5)


def test_feature_perturbation_only_in_training_mode(tmp_path):
    trainer = make_trainer("unimatch", tiny_config(), tmp_path)
    net = trainer.model["net"]
    images = torch.rand(2, 3, 32, 32, generator=gen(8)) * 255
    net.eval()
    with torch.no_grad():
        logits, features, perturbed = net.forward_with_perturbed_features(images, 0.5)
        plain, plain_features = net(images)
    torch.testing.assert_close(perturbed, logits)
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(features, plain_features)
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        logits, _, perturbed = net.forward_with_perturbed_features(images, 0.5)
    assert (perturbed - logits).abs().max() > 1e-3


def test_crop_padding_is_marked_invalid():
    image = np.full((10, 12, 3), 7, dtype=np.uint8)
    label = np.zeros((10, 12), dtype=np.int64)
    crops = [pad_and_crop(image, label, 16, np.random.default_rng(s)) for s in range(5)]
    for cropped, cropped_label, valid in crops:
        assert valid.shape == (16, 16) and valid.sum() == 10 * 12
        assert (cropped_label[~valid] == IGNORE).all() and (cropped[~valid] == 0).all()
        assert (cropped[valid] == 7).all()
    _, _, full = pad_and_crop(
        np.zeros((20, 20, 3)), np.zeros((20, 20)), 16, np.random.default_rng(0)
    )
    assert full.all()


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("fixmatch", {"loss_sup", "loss_strong"}),
        ("unimatch", {"loss_sup", "loss_strong1", "loss_strong2", "loss_feature"}),
    ],
)
def test_control_steps_train_the_student_without_a_teacher(method, expected, tmp_path):
    # tau 0: every valid pixel counts, so every unlabeled term carries a gradient
    config = tiny_config(overrides={"methods": {method: {"threshold": 0.0}}})
    trainer = make_trainer(method, config, tmp_path)
    assert trainer.teacher is None and "heads" not in trainer.model
    before = {k: v.clone() for k, v in trainer.model["net"].state_dict().items()}
    logs = trainer.train_step()
    assert {k for k in logs if k.startswith("loss_")} == expected
    for key in expected:
        assert torch.isfinite(logs[key]) and float(logs[key]) > 0, key
    assert float(logs["pseudo_above_tau"]) == 1.0
    assert 0.0 <= float(logs["pseudo_accuracy"]) <= 1.0
    after = trainer.model["net"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.model.training  # the eval-mode partner forward restored the modes


def test_threshold_one_leaves_only_the_labeled_term(tmp_path):
    config = tiny_config(overrides={"methods": {"fixmatch": {"threshold": 1.01}}})
    logs = make_trainer("fixmatch", config, tmp_path).train_step()
    assert float(logs["loss_strong"]) == 0.0 and float(logs["pseudo_above_tau"]) == 0.0


def test_pseudo_labels_come_from_the_joint_train_mode_forward(tmp_path, monkeypatch):
    """The weak crops share the labeled batch's forward: the student sees one batch of labeled
    plus unlabeled images, then the strong views, and one eval-mode forward for the partners."""
    trainer = make_trainer("fixmatch", tiny_config(), tmp_path)
    net = trainer.model["net"]
    seen = []
    original = net.forward

    def recording(images):
        seen.append((images.shape[0], net.training))
        return original(images)

    monkeypatch.setattr(net, "forward", recording)
    trainer.train_step()
    assert seen == [(2, False), (4, True), (2, True)]


def test_controls_have_their_config_sections():
    config = config_from_dict({"methods": {"fixmatch": {"threshold": 0.0}}})
    assert config.methods.fixmatch.threshold == 0.0
    assert config.methods.unimatch.threshold == 0.95
    from memseg_bench.errors import UserError

    with pytest.raises(UserError, match="methods.unimatch.strong.cutmix_pob"):
        config_from_dict({"methods": {"unimatch": {"strong": {"cutmix_pob": 0.5}}}})


def test_softmax_confidence_matches_torch():
    from memseg_bench.methods.context import confidence_and_labels

    logits = torch.randn(2, 4, 3, 3, generator=gen(9))
    confidence, labels = confidence_and_labels(logits, (6, 6), align_corners=False)
    probs = F.softmax(F.interpolate(logits, size=(6, 6), mode="bilinear"), dim=1)
    torch.testing.assert_close(confidence, probs.max(1).values)
    assert torch.equal(labels, probs.argmax(1))
