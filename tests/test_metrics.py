import math

import pytest
import torch

from memseg_bench.metrics import confusion_matrix, scores


def _loop_confusion(pred, target, num_classes, ignore=255):
    counts = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != ignore:
            counts[t][p] += 1
    return torch.tensor(counts)


def test_confusion_matches_a_pixel_loop_and_skips_ignore():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 9, 7), generator=generator)
    target[:, :2] = 255
    pred = torch.randint(0, 4, (2, 9, 7), generator=generator)
    confusion = confusion_matrix(pred, target, 4)
    assert confusion.dtype == torch.int64
    assert confusion.device == pred.device
    assert torch.equal(confusion, _loop_confusion(pred, target, 4))
    assert int(confusion.sum()) == int((target != 255).sum())


def test_out_of_range_ids_raise():
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), 3)


def test_scores_against_hand_computed_values():
    # rows = ground truth, columns = prediction; class 2 appears nowhere.
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    result = scores(confusion, ["a", "b", "c"])
    assert result["per_class_iou"]["a"] == pytest.approx(3 / 4)
    assert result["per_class_iou"]["b"] == pytest.approx(2 / 3)
    assert result["per_class_iou"]["c"] is None
    assert result["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert result["pixel_accuracy"] == pytest.approx(5 / 6)
    assert result["mean_accuracy"] == pytest.approx((3 / 4 + 1) / 2)


def test_class_only_in_prediction_counts_as_zero_iou():
    confusion = torch.tensor([[2, 2], [0, 0]])
    result = scores(confusion, ["a", "b"])
    assert result["per_class_iou"]["b"] == 0.0
    assert result["miou"] == pytest.approx((2 / 4 + 0) / 2)
    assert result["mean_accuracy"] == pytest.approx(0.5)


def test_perfect_prediction_and_empty_matrix():
    target = torch.tensor([[0, 1], [2, 255]])
    result = scores(confusion_matrix(target.clamp(max=2), target, 3), ["a", "b", "c"])
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0
    empty = scores(torch.zeros(2, 2, dtype=torch.int64), ["a", "b"])
    assert empty["miou"] is None and empty["pixel_accuracy"] is None
    assert all(v is None for v in empty["per_class_iou"].values())


def test_scores_values_are_in_unit_range():
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (64, 64), generator=generator)
    pred = torch.where(torch.rand(64, 64, generator=generator) < 0.7, target, 0)
    result = scores(confusion_matrix(pred, target, 5), list("abcde"))
    for key in ("miou", "pixel_accuracy", "mean_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert not math.isnan(result["miou"])
    with pytest.raises(ValueError):
        scores(torch.zeros(3, 3, dtype=torch.int64), ["a", "b"])
