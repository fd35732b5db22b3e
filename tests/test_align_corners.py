"""model.align_corners: the grid of every bilinear resize of logits and feature maps, passed to
the decoder, the losses, the pseudo-labels, scoring and the exported graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from memseg_bench.config import Config, ModelConfig, config_from_dict, config_to_dict, stored_config
from memseg_bench.methods.losses import pseudo_label_ce, supervised_ce
from memseg_bench.models import build_segmenter
from memseg_bench.models.resize import resized
from memseg_bench.scoring import logits_for_image
from tests.trainers import make_trainer, tiny_config

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _bilinear(x, size, align_corners):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def test_the_paper_default_is_false_and_the_reference_behaviour_true():
    assert Config().model.align_corners is False
    official = config_from_dict({"methods": {"behaviour": "official"}})
    assert official.model.align_corners is True


def test_only_align_corners_true_keeps_the_corner_pixels():
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(0))
    corners = (slice(None), slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
    # Downsampled: the corner pixels' centres meet only with align_corners.
    aligned = resized(x, (4, 5), align_corners=True)
    unaligned = resized(x, (4, 5), align_corners=False)
    torch.testing.assert_close(aligned[corners], x[corners], rtol=0, atol=1e-6)
    assert (unaligned[corners] - x[corners]).abs().max() > 1e-2
    # Upsampled: the corners are kept either way (false clamps there), the pixels between differ.
    small = x[:, :, :4, :5]
    aligned_up = resized(small, (13, 17), align_corners=True)
    unaligned_up = resized(small, (13, 17), align_corners=False)
    torch.testing.assert_close(aligned_up[corners], small[corners], rtol=0, atol=1e-6)
    assert (aligned_up - unaligned_up).abs().max() > 1e-2
    assert resized(x, (13, 17), align_corners=True) is x


def _pair(arch: str = "deeplabv3plus"):
    torch.manual_seed(0)
    unaligned = build_segmenter(ModelConfig(arch=arch), 3, MEAN, STD).eval()
    aligned = build_segmenter(ModelConfig(arch=arch, align_corners=True), 3, MEAN, STD).eval()
    aligned.load_state_dict(unaligned.state_dict())
    return unaligned, aligned


def test_the_decoder_upsamples_the_aspp_map_with_the_models_setting():
    unaligned, aligned = _pair()
    assert (unaligned.align_corners, aligned.align_corners) == (False, True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        got, _ = aligned(x)
        other, _ = unaligned(x)
        head = aligned.head
        low, high = aligned.backbone((x - aligned.mean) / aligned.std)
        low = head.low_project(low)
        context = _bilinear(head.aspp(high), low.shape[-2:], True)
        manual = head.classifier(head.decoder(torch.cat([context, low], dim=1)))
    torch.testing.assert_close(got, manual)
    assert (got - other).abs().max() > 1e-4


def test_deeplabv2_has_no_inner_resize_to_change():
    unaligned, aligned = _pair("deeplabv2")
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        torch.testing.assert_close(aligned(x)[0], unaligned(x)[0], rtol=0, atol=0)


def test_losses_upsample_the_logits_with_the_given_setting():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    confidence = torch.rand(2, 8, 8, generator=g)
    for align in (False, True):
        up = _bilinear(logits, (8, 8), align)
        torch.testing.assert_close(
            supervised_ce(logits, labels, align_corners=align), F.cross_entropy(up, labels)
        )
        expected = (F.cross_entropy(up, labels, reduction="none") * confidence**6).mean()
        torch.testing.assert_close(
            pseudo_label_ce(logits, labels, confidence, align_corners=align), expected
        )
    assert supervised_ce(logits, labels, align_corners=True) != supervised_ce(logits, labels)


def test_scoring_upsamples_with_the_given_setting():
    _, aligned = _pair()
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(3)) * 255
    with torch.no_grad():
        raw = aligned(image)[0]
        got = logits_for_image(aligned, image, out_size=(50, 70), align_corners=True)
        default = logits_for_image(aligned, image, out_size=(50, 70))
    expected = _bilinear(_bilinear(raw, (40, 56), True), (50, 70), True)
    torch.testing.assert_close(got, expected)
    assert (got - default).abs().max() > 1e-4


@pytest.fixture
def bilinear_calls(monkeypatch):
    """The align_corners of every bilinear F.interpolate call made while the test runs."""
    calls = []
    original = F.interpolate

    def recording(*args, **kwargs):
        if kwargs.get("mode") == "bilinear":
            calls.append(kwargs.get("align_corners"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", recording)
    return calls


@pytest.mark.parametrize("align", [False, True])
def test_a_tiny_run_trains_and_scores_with_one_setting_throughout(align, bilinear_calls, tmp_path):
    from memseg_bench.scoring import score_split
    from tests.fakes import make_folder

    config = tiny_config(overrides={"model": {"align_corners": align}})
    trainer = make_trainer("memseg", config, tmp_path)
    for _ in range(2):
        logs = trainer.train_step()
    assert torch.isfinite(logs["loss"]) and "loss_contr_lab" in logs
    trained = len(bilinear_calls)
    assert trained >= 6  # decoder (student, teacher), pseudo-labels, CE, pseudo CE, entropy
    make_folder(tmp_path / "data", counts={"train": 2, "val": 3}, size=(20, 28), num_classes=4)
    scoring = dataclasses.replace(
        config, data=dataclasses.replace(config.data, name="folder", root=str(tmp_path / "data"))
    )
    from memseg_bench.data.datasets import open_dataset

    net = trainer.ctx.model["net"]
    result = score_split(net, open_dataset(scoring.data), "val", scoring, "cpu", progress=False)
    assert result["num_images"] == 3
    assert len(bilinear_calls) > trained
    assert set(bilinear_calls) == {align}


def test_model_files_written_before_the_knob_load_with_their_paper_value():
    values = config_to_dict(config_from_dict({"methods": {"behaviour": "official"}}))
    del values["model"]["align_corners"]
    del values["methods"]["phase_start"]
    old = stored_config(values)
    assert old.model.align_corners is False and old.methods.phase_start == "at"
    assert old.model.resnet_layout == "caffe"  # the rest of the behaviour stays
    current = config_from_dict({"methods": {"behaviour": "official"}})
    assert stored_config(config_to_dict(current)) == current


def test_the_exported_graph_upsamples_with_the_models_setting(tmp_path):
    import onnxruntime as ort

    from memseg_bench.export import FullResolution, export_onnx
    from memseg_bench.models import load_segmenter
    from tests.test_export_predict import write_model_file

    write_model_file(tmp_path / "model.pt", Config(model=ModelConfig(align_corners=True)))
    onnx_path = tmp_path / "student.onnx"
    report = export_onnx(
        tmp_path / "model.pt", onnx_path, tmp_path / "check.json", sizes=[[32, 32], [48, 40]]
    )
    assert report["passed"] and report["max_abs_diff"] <= 1e-3
    segmenter = load_segmenter(tmp_path / "model.pt")[0]
    assert segmenter.align_corners is True
    image = np.random.default_rng(0).uniform(0, 255, (1, 3, 37, 51)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": image})
    with torch.no_grad():
        raw = segmenter(torch.from_numpy(image))[0]
        expected = FullResolution(segmenter)(torch.from_numpy(image)).numpy()
    assert np.abs(logits - expected).max() < 1e-3
    unaligned = _bilinear(raw, (37, 51), False).numpy()
    assert np.abs(logits - unaligned).max() > 1e-2
