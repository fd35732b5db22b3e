import dataclasses

import pytest
import torch

from memseg_bench.config import Config, ModelConfig, config_hash, config_to_dict
from memseg_bench.errors import UserError
from memseg_bench.models import ClassSelectors, build_heads, build_segmenter, load_segmenter
from memseg_bench.models.backbones import build_backbone
from memseg_bench.torchvision_shim import tv_models

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
CHANNELS = {
    "resnet18": (64, 512),
    "resnet50": (256, 2048),
    "resnet101": (256, 2048),
    "mobilenet_v3_large": (24, 960),
}


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize(
    "backbone,stride",
    [
        ("resnet18", 16),
        ("resnet18", 8),
        ("resnet50", 16),
        ("resnet101", 16),
        ("mobilenet_v3_large", 16),
    ],
)
def test_deeplabv3plus_shapes_and_backbone_strides(backbone, stride):
    net = build_segmenter(ModelConfig(backbone=backbone, output_stride=stride), 5, MEAN, STD)
    seen = {}
    net.backbone.register_forward_hook(lambda module, args, out: seen.update(out=out))
    with torch.no_grad():
        logits, features = net.eval()(images(2, 64))
    low, high = seen["out"]
    assert (net.backbone.low_channels, net.backbone.high_channels) == CHANNELS[backbone]
    assert tuple(low.shape) == (2, CHANNELS[backbone][0], 16, 16)
    assert tuple(high.shape) == (2, CHANNELS[backbone][1], 64 // stride, 64 // stride)
    assert tuple(logits.shape) == (2, 5, 16, 16)
    assert tuple(features.shape) == (2, 256, 16, 16)
    assert net.feature_channels == 256 and net.num_classes == 5
    assert torch.isfinite(logits).all()


def test_decoder_width_sets_the_feature_channels():
    narrow = build_segmenter(ModelConfig(decoder_channels=32), 5, MEAN, STD)
    with torch.no_grad():
        logits, features = narrow(images())
    assert narrow.feature_channels == 32 and features.shape == (2, 32, 16, 16)
    assert logits.shape == (2, 5, 16, 16)
    assert narrow.head.aspp.project[0][0].out_channels == 32


def test_deeplabv3plus_trains_end_to_end():
    net = build_segmenter(ModelConfig(backbone="resnet18"), 5, MEAN, STD).train()
    logits, features = net(images(2, 32))
    assert tuple(logits.shape) == (2, 5, 8, 8) and tuple(features.shape) == (2, 256, 8, 8)
    (logits.mean() + features.mean()).backward()
    assert all(p.grad is not None for p in net.head.classifier.parameters())
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    assert net.head.aspp.branches[-1].conv[0].weight.grad.abs().sum() > 0


def test_deeplabv2_resnet101_at_stride_8():
    net = build_segmenter(
        ModelConfig(arch="deeplabv2", backbone="resnet101", output_stride=8), 4, MEAN, STD
    ).eval()
    with torch.no_grad():
        logits, features = net(images(2, 32))
    assert tuple(logits.shape) == (2, 4, 4, 4)
    assert tuple(features.shape) == (2, 2048, 4, 4)
    assert net.feature_channels == 2048


def _v2(branches: int) -> torch.nn.Module:
    cfg = ModelConfig(arch="deeplabv2", backbone="resnet18", output_stride=8, v2_branches=branches)
    return build_segmenter(cfg, 3, MEAN, STD).eval()


def test_v2_branches_2_sums_only_rates_6_and_12():
    torch.manual_seed(0)
    paper, official = _v2(4), _v2(2)
    official.load_state_dict(paper.state_dict())
    x = images(1, 48)
    with torch.no_grad():
        before_paper, features = paper(x)
        before_official, _ = official(x)
        manual = sum(official.head.branches[i](features) for i in range(2))
        for net in (paper, official):
            for branch in net.head.branches[2:]:
                branch.weight.add_(torch.randn_like(branch.weight))
        after_paper, _ = paper(x)
        after_official, _ = official(x)
    torch.testing.assert_close(after_official, before_official)
    torch.testing.assert_close(before_official, manual)
    assert (after_paper - before_paper).abs().max() > 1e-3
    assert (before_paper - before_official).abs().max() > 1e-6


def test_backbone_bn_affine_frozen_keeps_the_backbone_batchnorm_weights():
    def batchnorm_grads(affine: str):
        torch.manual_seed(0)
        cfg = ModelConfig(backbone="resnet18", decoder_channels=16, backbone_bn_affine=affine)
        net = build_segmenter(cfg, 3, MEAN, STD).train()
        logits, _ = net(images(2, 32))
        logits.square().mean().backward()
        backbone = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        head = [m for m in net.head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return backbone, head

    backbone, head = batchnorm_grads("frozen")
    assert backbone and all(not m.weight.requires_grad and m.weight.grad is None for m in backbone)
    assert all(m.bias.grad is None for m in backbone)
    assert all(m.weight.grad is not None for m in head)  # only the backbone's are frozen
    backbone, _ = batchnorm_grads("trained")
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in backbone)


def test_dilation_matches_torchvision_replace_stride_with_dilation():
    ours = build_backbone("resnet50", 8).eval()
    reference = tv_models().resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if "fc." not in k})
    x = images(1, 32) / 255
    with torch.no_grad():
        _, high = ours(x)
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
    torch.testing.assert_close(high, expected)


def test_normalisation_happens_inside():
    torch.manual_seed(0)
    raw = build_segmenter(ModelConfig(), 3, MEAN, STD).eval()
    plain = build_segmenter(ModelConfig(), 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()
    plain.load_state_dict(raw.state_dict())
    x = images(2, 32)
    normalised = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(raw(x)[0], plain(normalised)[0], atol=1e-4, rtol=1e-4)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    net = build_segmenter(ModelConfig(), 3, MEAN, STD).eval()
    x = images(2, 32)
    with torch.no_grad():
        expected = net(x)
        net = net.to(memory_format=torch.channels_last)
        actual = net(x.contiguous(memory_format=torch.channels_last))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_backbone_weights_round_trip(backbone, tmp_path):
    torch.manual_seed(1)
    source = getattr(tv_models(), backbone)()
    state = source.state_dict()
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    net = build_segmenter(ModelConfig(backbone=backbone, weights=str(path)), 3, MEAN, STD)
    loaded = net.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith(("fc.", "classifier."))}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_weights_without_batchnorm_counters_load(tmp_path):
    state = tv_models().resnet18().state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    net = build_segmenter(ModelConfig(weights=str(tmp_path / "old.pth")), 3, MEAN, STD)
    torch.testing.assert_close(net.backbone.conv1.weight, state["conv1.weight"])


def test_missing_weights_file_names_the_option(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"model.weights: file not found: {missing}"):
        build_segmenter(ModelConfig(weights=str(missing)), 3, MEAN, STD)


def test_mismatched_weights_file_names_file_and_key(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(tv_models().resnet50().state_dict(), path)
    with pytest.raises(UserError) as info:
        build_segmenter(ModelConfig(backbone="resnet18", weights=str(path)), 3, MEAN, STD)
    message = str(info.value)
    assert "model.weights" in message and str(path) in message
    assert "'layer1.0.conv1.weight'" in message and "\n" not in message


@pytest.mark.parametrize("content", ["text", "partial", "tensor_list"])
def test_weights_file_that_is_not_a_backbone_state_dict(content, tmp_path):
    path = tmp_path / "bad.pth"
    if content == "text":
        path.write_text("hello")
    elif content == "partial":
        state = tv_models().resnet18().state_dict()
        del state["layer2.0.bn1.weight"]
        torch.save(state, path)
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError) as info:
        build_segmenter(ModelConfig(weights=str(path)), 3, MEAN, STD)
    assert "model.weights" in str(info.value) and str(path) in str(info.value)
    if content == "partial":
        assert "missing key 'layer2.0.bn1.weight'" in str(info.value)


def test_bad_output_stride_is_a_user_error():
    with pytest.raises(UserError, match="model.output_stride"):
        build_segmenter(ModelConfig(output_stride=32), 3, MEAN, STD)
    with pytest.raises(UserError, match="model.output_stride"):
        build_segmenter(ModelConfig(backbone="mobilenet_v3_large", output_stride=8), 3, MEAN, STD)


def test_class_selectors_score_per_class_in_unit_interval():
    torch.manual_seed(0)
    selectors = ClassSelectors(4, 16).train()
    x = torch.randn(9, 16, requires_grad=True)
    classes = torch.tensor([2, 0, 255, 3, 0, 2, 0, 0, 2])  # 255 left out, class 1 absent
    scores = selectors(x, classes)
    assert scores.shape == (9,)
    assert ((scores > 0) & (scores < 1)).all()
    expected = torch.sigmoid(selectors.mlp.eval().forward_group(x[classes == 2], 2))[:, 0]
    assert not torch.allclose(scores[classes == 2], expected)  # batch, not running, statistics
    scores[classes != 255].sum().backward()
    assert x.grad[classes != 255].abs().sum() > 0 and (x.grad[classes == 255] == 0).all()


def test_class_selectors_score_all_skips_empty_slots():
    torch.manual_seed(0)
    selectors = ClassSelectors(3, 8).train()
    memory = torch.randn(3, 5, 8)
    filled = torch.arange(5)[None, :] < torch.tensor([[5], [2], [0]])
    scores = selectors.score_all(memory, filled)
    assert scores.shape == (3, 5)
    moved = memory.clone()
    moved[~filled] = 100.0  # what lies in an empty slot changes nothing
    torch.testing.assert_close(selectors.score_all(moved, filled)[filled], scores[filled])
    assert selectors.score_all(memory).shape == (3, 5)


def test_build_heads_shapes():
    heads = build_heads(512, 4, 32).train()
    assert set(heads) == {"projection", "prediction", "selectors_feature", "selectors_memory"}
    pixels = torch.randn(10, 512)
    valid = torch.zeros(10, dtype=torch.long)
    projected = heads["projection"](pixels, valid)
    assert projected.shape == (10, 32)
    assert heads["prediction"](projected, valid).shape == (10, 32)
    assert isinstance(heads["selectors_memory"], ClassSelectors)
    assert heads["selectors_feature"].mlp.weight2.shape == (4, 1, 32)


def write_model_file(path, config: Config | None = None, num_classes: int = 3):
    config = config or Config()
    torch.manual_seed(0)
    net = build_segmenter(config.model, num_classes, config.data.mean, config.data.std)
    torch.save(
        {
            "model_state": net.state_dict(),
            "config": config_to_dict(config),
            "class_names": [f"c{i}" for i in range(num_classes)],
            "palette": [[40 * i, 255 - 40 * i, 7 * i] for i in range(num_classes)],
            "config_hash": config_hash(config),
            "step": 5,
        },
        path,
    )
    return net


def test_load_segmenter_round_trip(tmp_path):
    config = dataclasses.replace(
        Config(), model=ModelConfig(arch="deeplabv2", backbone="resnet18", output_stride=8)
    )
    net = write_model_file(tmp_path / "model.pt", config, num_classes=4).eval()
    loaded, info = load_segmenter(tmp_path / "model.pt")
    assert not loaded.training
    assert info["config"] == config and info["class_names"] == ["c0", "c1", "c2", "c3"]
    assert info["step"] == 5 and "model_state" not in info
    x = images(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], net(x)[0])


def test_load_segmenter_errors(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        load_segmenter(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(UserError, match="junk.pt"):
        load_segmenter(tmp_path / "junk.pt")
    torch.save({"model_state": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match="partial.pt"):
        load_segmenter(tmp_path / "partial.pt")


def test_resnet_caffe_layout_strides_on_the_1x1_and_dilates_every_block():
    torchvision_net = build_backbone("resnet50", 8)
    caffe = build_backbone("resnet50", 8, "caffe")
    assert caffe.maxpool.ceil_mode and not torchvision_net.maxpool.ceil_mode
    first = caffe.layer2[0]
    assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))
    assert (torchvision_net.layer2[0].conv1.stride, torchvision_net.layer2[0].conv2.stride) == (
        (1, 1),
        (2, 2),
    )
    for stage, rate in (("layer3", 2), ("layer4", 4)):
        assert all(b.conv2.dilation == (rate, rate) for b in getattr(caffe, stage)), stage
        assert all(b.conv2.stride == (1, 1) for b in getattr(caffe, stage))
        # torchvision's dilated stages keep the previous rate on the first block's 3x3.
        assert getattr(torchvision_net, stage)[0].conv2.dilation == (rate // 2, rate // 2)
    # Same parameters, a different function.
    caffe.load_state_dict(torchvision_net.state_dict())
    x = images(1, 64)
    with torch.no_grad():
        low_c, high_c = caffe.eval()((x - 127) / 64)
        low_t, high_t = torchvision_net.eval()((x - 127) / 64)
    # The max-pool rounds up: 17 rows where torchvision's gives 16.
    assert tuple(low_c.shape[-2:]) == (17, 17) and tuple(low_t.shape[-2:]) == (16, 16)
    assert high_c.shape[-1] == 9 and high_t.shape[-1] == 8
    basic = build_backbone("resnet18", 8, "caffe")
    assert basic.maxpool.ceil_mode and basic.layer2[0].conv1.stride == (2, 2)
    assert all(b.conv1.dilation == (4, 4) for b in basic.layer4)


@pytest.mark.parametrize("init", ["kaiming", "normal"])
def test_head_init(init):
    cfg = ModelConfig(backbone="resnet18", decoder_channels=32, head_init=init)
    head = build_segmenter(cfg, 3, MEAN, STD).head
    weight = head.decoder[0][0].weight  # a 3x3 conv over 32 + 48 channels
    expected = 0.01 if init == "normal" else (2.0 / (weight[0].numel())) ** 0.5
    assert weight.std().item() == pytest.approx(expected, rel=0.05)
    classifier_std = head.classifier.weight.std().item()
    assert (classifier_std == pytest.approx(0.01, rel=0.2)) == (init == "normal")
