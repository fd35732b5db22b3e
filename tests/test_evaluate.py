import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memseg_bench.metrics import confusion_matrix, scores
from memseg_bench.scoring import _starts, evaluate_segmenter, logits_for_image


class PixelSegmenter(nn.Module):
    """Per-pixel (1x1) classifier: its logits do not depend on tiling."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        logits = self.conv(x / 255.0)
        return logits, logits


class StridedSegmenter(PixelSegmenter):
    """Logits at stride 4, as a real segmenter returns them."""

    def forward(self, x):
        logits = F.avg_pool2d(self.conv(x / 255.0), 4, ceil_mode=True)
        return logits, logits


class OracleSegmenter(nn.Module):
    """Reads the class from channel 0 (value = 50 * class): perfect one-hot logits."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        classes = (x[:, 0] / 50).round().long().clamp(0, self.num_classes - 1)
        logits = F.one_hot(classes, self.num_classes).permute(0, 3, 1, 2).float() * 10
        return logits + self.dummy, None


def _image(h, w, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=generator) * 255


def test_window_starts_cover_every_pixel():
    for size, window, stride in [(100, 32, 21), (64, 64, 40), (20, 32, 21), (97, 40, 40)]:
        starts = _starts(size, window, stride)
        covered = torch.zeros(max(size, window), dtype=torch.bool)
        for s in starts:
            covered[s : s + window] = True
            assert s + window <= max(size, window)
        assert covered[:size].all()
        assert starts == sorted(starts)


@pytest.mark.parametrize("size", [(37, 53), (20, 24), (64, 64)])
def test_sliding_equals_whole_for_a_pixelwise_model(size):
    model = PixelSegmenter().eval()
    image = _image(*size)
    whole = logits_for_image(model, image, "whole")
    sliding = logits_for_image(model, image, "sliding", window=32, stride=21)
    assert whole.shape == sliding.shape == (1, 3, *size)
    torch.testing.assert_close(sliding, whole, atol=1e-5, rtol=1e-5)


def test_strided_logits_upsampled_to_input_and_out_size():
    model = StridedSegmenter().eval()
    image = _image(30, 42)
    raw = model(image)[0]
    logits = logits_for_image(model, image, "whole")
    assert logits.shape == (1, 3, 30, 42)
    expected = F.interpolate(raw, size=(30, 42), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, expected)
    big = logits_for_image(model, image, "whole", out_size=(60, 84))
    assert big.shape == (1, 3, 60, 84)
    torch.testing.assert_close(
        big, F.interpolate(expected, size=(60, 84), mode="bilinear", align_corners=False)
    )


def test_sliding_averages_overlapping_tiles():
    model = StridedSegmenter().eval()
    image = _image(40, 40)
    window, stride = 32, 8
    manual = torch.zeros(1, 3, 40, 40)
    count = torch.zeros(1, 1, 40, 40)
    for top in (0, 8):
        for left in (0, 8):
            tile = image[:, :, top : top + 32, left : left + 32]
            manual[:, :, top : top + 32, left : left + 32] += logits_for_image(model, tile)
            count[:, :, top : top + 32, left : left + 32] += 1
    got = logits_for_image(model, image, "sliding", window=window, stride=stride, tile_batch=3)
    torch.testing.assert_close(got, manual / count, atol=1e-5, rtol=1e-5)


def test_bad_mode_raises():
    with pytest.raises(ValueError):
        logits_for_image(PixelSegmenter(), _image(8, 8), "tiles")


def _dataset(sizes, num_classes=3, label_scale=1, noise=0.0):
    items = []
    generator = torch.Generator().manual_seed(3)
    for i, (h, w) in enumerate(sizes):
        label = torch.randint(0, num_classes, (h, w), generator=generator)
        image = torch.zeros(3, h, w)
        image[0] = label.float() * 50
        if noise:
            flip = torch.rand(h, w, generator=generator) < noise
            image[0][flip] = ((label[flip] + 1) % num_classes).float() * 50
        label = label.repeat_interleave(label_scale, 0).repeat_interleave(label_scale, 1)
        label[0, :] = 255
        items.append({"image": image, "label": label, "id": f"img{i}"})
    return items


def test_evaluate_oracle_scores_one_and_restores_train_mode():
    model = OracleSegmenter().train()
    data = _dataset([(16, 16), (16, 16), (12, 20), (16, 16)])
    result = evaluate_segmenter(model, data, 3, ["a", "b", "c"], batch=2, progress=False)
    assert result["miou"] == pytest.approx(1.0)
    assert result["num_images"] == 4
    assert result["eval_mode"] == "whole"
    assert model.modes and not any(model.modes)
    assert model.training


def test_evaluate_matches_a_manual_confusion_with_errors():
    model = OracleSegmenter()
    data = _dataset([(16, 16), (12, 20), (16, 16)], noise=0.3)
    result = evaluate_segmenter(model, data, 3, ["a", "b", "c"], batch=4, progress=False)
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    for item in data:
        pred = (item["image"][0] / 50).round().long()
        confusion += confusion_matrix(pred, item["label"], 3)
    expected = scores(confusion, ["a", "b", "c"])
    assert result["miou"] == pytest.approx(expected["miou"])
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"])
    assert 0.3 < result["miou"] < 0.9


def test_evaluate_half_resolution_input_full_resolution_label():
    model = OracleSegmenter()
    data = _dataset([(8, 8), (8, 8)], label_scale=2)
    assert data[0]["label"].shape == (16, 16)
    result = evaluate_segmenter(
        model, data, 3, ["a", "b", "c"], mode="sliding", window=8, stride=4, progress=False
    )
    assert result["num_images"] == 2
    assert result["eval_mode"] == "sliding"
    assert result["pixel_accuracy"] > 0.6


@pytest.mark.parametrize("batch", [1, 3])
def test_score_split_uses_the_protocols_batch_and_scale(batch, tmp_path):
    from memseg_bench.config import config_from_dict
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.scoring import score_split
    from tests.fakes import make_folder

    make_folder(tmp_path, counts={"train": 2, "val": 6}, size=(8, 12), num_classes=3)
    config = config_from_dict(
        {
            "data": {"name": "folder", "root": str(tmp_path), "input_scale": 0.5},
            "evaluate": {"batch": batch},
        }
    )
    model = PixelSegmenter(num_classes=3)
    sizes = []
    model.register_forward_hook(lambda module, args, out: sizes.append(tuple(args[0].shape)))
    result = score_split(model, open_dataset(config.data), "val", config, "cpu", progress=False)
    assert result["num_images"] == 6
    assert sizes == [(batch, 3, 4, 6)] * (6 // batch)
