"""Confusion-matrix segmentation metrics: IoU per class, mIoU, pixel and mean accuracy.

Pure tensor functions: the confusion matrix lives on the device of its inputs, so evaluation can
accumulate it there and synchronise once at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memseg_bench.labels import IGNORE


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE
) -> torch.Tensor:
    """[C, C] int64 counts (rows: ground truth, columns: prediction); `ignore_index` is skipped.

    Class ids outside 0..C-1 (other than `ignore_index`) are a bug upstream and raise ValueError
    instead of being dropped silently.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = target != ignore_index
    target = target[valid]
    pred = pred[valid]
    if target.numel():
        bad_target = (target < 0) | (target >= num_classes)
        bad_pred = (pred < 0) | (pred >= num_classes)
        if bool((bad_target | bad_pred).any()):
            raise ValueError(f"class ids outside 0..{num_classes - 1} (ignore {ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scores(confusion: torch.Tensor, class_names: Sequence[str]) -> dict:
    """mIoU over the classes present in the ground truth or the prediction, per-class IoU (None for
    a class absent from both), pixel accuracy and mean class accuracy (over classes present in the
    ground truth). All values are plain floats in [0, 1] (None when undefined)."""
    confusion = confusion.detach().to("cpu", torch.float64)
    num_classes = confusion.shape[0]
    if confusion.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(
            f"confusion {tuple(confusion.shape)} does not match {len(class_names)} class names"
        )
    tp = confusion.diag()
    gt = confusion.sum(1)
    predicted = confusion.sum(0)
    union = gt + predicted - tp
    per_class: dict[str, float | None] = {}
    ious, accuracies = [], []
    for c, name in enumerate(class_names):
        if union[c] > 0:
            iou = float(tp[c] / union[c])
            per_class[name] = iou
            ious.append(iou)
        else:
            per_class[name] = None
        if gt[c] > 0:
            accuracies.append(float(tp[c] / gt[c]))
    total = float(confusion.sum())
    return {
        "miou": _mean(ious),
        "per_class_iou": per_class,
        "pixel_accuracy": float(tp.sum()) / total if total > 0 else None,
        "mean_accuracy": _mean(accuracies),
    }
