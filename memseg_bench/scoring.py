"""Evaluation: whole-image or sliding-window logits, and a confusion-matrix pass over a dataset.

The segmenter takes float RGB 0..255 (it normalises inside) and returns (logits at its feature
stride, features). Logits are upsampled bilinearly to the input size, then to the label size when
the two differ (the Cityscapes DeepLabv2 protocol feeds a half-resolution image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memseg_bench.metrics import confusion_matrix, scores
from memseg_bench.models.resize import resized

MODES = ("whole", "sliding")


def _forward(segmenter, x: torch.Tensor, align_corners: bool) -> torch.Tensor:
    logits = segmenter(x)[0].float()
    return resized(logits, x.shape[-2:], align_corners=align_corners)


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..size: a regular grid whose last window ends at the border."""
    if size <= window:
        return [0]
    count = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def _sliding(
    segmenter, image: torch.Tensor, window: int, stride: int, tile_batch: int, align_corners: bool
) -> torch.Tensor:
    batch, _, height, width = image.shape
    pad_h, pad_w = max(window - height, 0), max(window - width, 0)
    if pad_h or pad_w:
        # Pad bottom/right with 0 (black in 0..255), as training pads; cropped off below.
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    full_h, full_w = image.shape[-2:]
    boxes = [
        (top, left)
        for top in _starts(full_h, window, stride)
        for left in _starts(full_w, window, stride)
    ]
    total = None
    count = image.new_zeros(1, 1, full_h, full_w)
    for first in range(0, len(boxes), tile_batch):
        chunk = boxes[first : first + tile_batch]
        tiles = torch.cat([image[:, :, t : t + window, s : s + window] for t, s in chunk])
        logits = _forward(segmenter, tiles, align_corners)
        if total is None:
            total = logits.new_zeros(batch, logits.shape[1], full_h, full_w)
        for i, (top, left) in enumerate(chunk):
            part = logits[i * batch : (i + 1) * batch]
            total[:, :, top : top + window, left : left + window] += part
            count[:, :, top : top + window, left : left + window] += 1
    return (total / count)[:, :, :height, :width]


def logits_for_image(
    segmenter,
    image: torch.Tensor,
    mode: str = "whole",
    window: int = 512,
    stride: int = 341,
    out_size: Sequence[int] | None = None,
    tile_batch: int = 4,
    align_corners: bool = False,
) -> torch.Tensor:
    """Logits [B, C, H', W'] for images [B, 3, H, W] (float 0..255) at `out_size` (default: the
    input size). `sliding` averages the logits of window x window tiles placed every `stride`
    pixels (the last tile flush with the border); an image smaller than the window is padded.
    Every upsampling is bilinear with `align_corners` (the model's model.align_corners)."""
    if mode not in MODES:
        raise ValueError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(image.shape)}")
    if mode == "whole":
        logits = _forward(segmenter, image, align_corners)
    else:
        if window <= 0 or stride <= 0 or stride > window:
            raise ValueError(f"sliding window needs 0 < stride <= window, got {stride}, {window}")
        logits = _sliding(segmenter, image, window, stride, tile_batch, align_corners)
    return logits if out_size is None else resized(logits, out_size, align_corners=align_corners)


def _groups(dataset, batch: int):
    """Consecutive runs of up to `batch` items whose image and label sizes agree."""
    group: list[dict] = []
    for index in range(len(dataset)):
        item = dataset[index]
        if group and (
            len(group) == batch
            or group[0]["image"].shape != item["image"].shape
            or group[0]["label"].shape != item["label"].shape
        ):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def evaluate_segmenter(
    segmenter,
    dataset,
    num_classes: int,
    class_names: Sequence[str],
    mode: str = "whole",
    window: int = 512,
    stride: int = 341,
    device: torch.device | str = "cpu",
    batch: int = 1,
    amp: bool = False,
    progress: bool = True,
    align_corners: bool = False,
) -> dict:
    """Score a segmenter on a dataset of {"image": float [3, h, w] 0..255, "label": long [H, W]}:
    the `scores` dict plus "num_images" and "eval_mode". The model is put in eval mode for the pass
    and its previous mode restored afterwards."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    device = torch.device(device)
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    was_training = segmenter.training
    segmenter.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    seen = 0
    bar = Progress(
        TextColumn(f"[bold]evaluate ({mode})"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not progress,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    try:
        with bar, torch.inference_mode():
            task = bar.add_task("evaluate", total=len(dataset))
            for group in _groups(dataset, max(1, batch)):
                images = torch.stack([item["image"] for item in group]).to(device).float()
                labels = torch.stack([item["label"] for item in group]).to(device)
                with autocast:
                    logits = logits_for_image(
                        segmenter,
                        images,
                        mode,
                        window,
                        stride,
                        out_size=labels.shape[-2:],
                        align_corners=align_corners,
                    )
                confusion += confusion_matrix(logits.argmax(1), labels, num_classes)
                seen += len(group)
                bar.update(task, advance=len(group))
    finally:
        segmenter.train(was_training)
    result = scores(confusion, class_names)
    result["num_images"] = seen
    result["eval_mode"] = mode
    return result


def score_split(segmenter, index, split: str, config, device, progress: bool = True) -> dict:
    """Score a segmenter on one split of an opened dataset with the protocol's evaluate settings
    (mode, window, stride, batch) and the data's input scale."""
    from memseg_bench.data.loader import SegmentationDataset

    dataset = SegmentationDataset(
        index,
        split,
        index.ids(split),
        crop=None,
        train=False,
        seed=0,
        input_scale=config.data.input_scale,
    )
    settings = config.evaluate
    return evaluate_segmenter(
        segmenter,
        dataset,
        len(index.class_names),
        index.class_names,
        mode=settings.mode,
        window=settings.window,
        stride=settings.stride,
        device=device,
        batch=settings.batch,
        progress=progress,
        align_corners=config.model.align_corners,
    )
