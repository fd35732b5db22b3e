"""Tiny fake dataset trees in the published layouts, for tests.

Every builder writes random images and labels with a fixed seed and returns
{(split, id): (image uint8 HxWx3, expected label uint8 HxW after conversion)}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from memseg_bench.data.datasets import (
    CITYSCAPES_LABEL_IDS,
    VOC_PALETTE,
)

Samples = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]


def _image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _labels(rng: np.random.Generator, height: int, width: int, num_classes: int) -> np.ndarray:
    label = rng.integers(0, num_classes, (height, width)).astype(np.uint8)
    label[0, :3] = 255  # a few ignore pixels
    return label


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def make_folder(
    root: Path,
    counts: dict[str, int] | None = None,
    size: tuple[int, int] = (16, 24),
    num_classes: int = 4,
    image_ext: str = ".png",
    lists: bool = True,
    seed: int = 0,
) -> Samples:
    """Generic layout: images/<split>/<id><ext>, labels/<split>/<id>.png, classes.json, lists."""
    counts = counts or {"train": 6, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    samples: Samples = {}
    for split, n in counts.items():
        ids = [f"{split}{i:03d}" for i in range(n)]
        for item in ids:
            image, label = _image(rng, *size), _labels(rng, *size, num_classes)
            if image_ext == ".png":
                _save(root / "images" / split / f"{item}.png", image)
            else:
                _save(root / "images" / split / f"{item}{image_ext}", image, quality=100)
                image = np.asarray(Image.open(root / "images" / split / f"{item}{image_ext}"))
            _save(root / "labels" / split / f"{item}.png", label)
            samples[(split, item)] = (image, label)
        if lists:
            (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    classes = {
        "classes": [f"class{k}" for k in range(num_classes)],
        "palette": [[10 * k, 20 * k, 30 * k] for k in range(num_classes)],
        "num_classes": num_classes,
        "ignore_index": 255,
    }
    (root / "classes.json").write_text(json.dumps(classes))
    return samples


def make_voc(
    root: Path,
    train: int = 4,
    val: int = 2,
    aug: bool = True,
    size: tuple[int, int] = (16, 20),
    seed: int = 0,
) -> Samples:
    """VOC2012 root: JPEGImages/*.jpg, SegmentationClassAug/*.png (mode L) when `aug`, else
    SegmentationClass/*.png palette masks (mode P), ImageSets/Segmentation/{train_aug,val}.txt."""
    rng = np.random.default_rng(seed)
    samples: Samples = {}
    lists = {"train_aug": [f"2007_{i:06d}" for i in range(train)]}
    lists["val"] = [f"2008_{i:06d}" for i in range(val)]
    for split, name in (("train", "train_aug"), ("val", "val")):
        for item in lists[name]:
            image, label = _image(rng, *size), _labels(rng, *size, 21)
            _save(root / "JPEGImages" / f"{item}.jpg", image, quality=100)
            image = np.asarray(Image.open(root / "JPEGImages" / f"{item}.jpg").convert("RGB"))
            if aug:
                _save(root / "SegmentationClassAug" / f"{item}.png", label)
            else:
                mask = Image.fromarray(label, mode="L").convert("P")
                mask.putpalette([v for c in VOC_PALETTE for v in c] + [224, 224, 192] * 235)
                (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
                mask.save(root / "SegmentationClass" / f"{item}.png")
            samples[(split, item)] = (image, label)
        listing = root / "ImageSets" / "Segmentation" / f"{name}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{i}\n" for i in lists[name]))
    return samples


def make_cityscapes(
    root: Path,
    cities: dict[str, list[str]] | None = None,
    per_city: int = 2,
    train_ids: bool = False,
    size: tuple[int, int] = (16, 32),
    seed: int = 0,
) -> Samples:
    """leftImg8bit/<split>/<city>/<id>_leftImg8bit.png and gtFine/.../<id>_gtFine_labelIds.png
    (labelIds 0..33); `train_ids` also writes the *_labelTrainIds.png files."""
    cities = cities or {"train": ["aachen", "bochum"], "val": ["frankfurt"]}
    rng = np.random.default_rng(seed)
    samples: Samples = {}
    to_train = np.full(256, 255, np.uint8)
    to_train[list(CITYSCAPES_LABEL_IDS)] = np.arange(19)
    for split, names in cities.items():
        for city in names:
            for k in range(per_city):
                stem = f"{city}_000000_{k:06d}"
                image = _image(rng, *size)
                label_ids = rng.integers(0, 34, size).astype(np.uint8)
                _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                gt = root / "gtFine" / split / city
                _save(gt / f"{stem}_gtFine_labelIds.png", label_ids)
                if train_ids:
                    _save(gt / f"{stem}_gtFine_labelTrainIds.png", to_train[label_ids])
                samples[(split, f"{city}/{stem}")] = (image, to_train[label_ids])
    return samples


def make_camvid(
    root: Path,
    counts: dict[str, int] | None = None,
    size: tuple[int, int] = (12, 16),
    seed: int = 0,
) -> Samples:
    """SegNet layout: <split>/<id>.png and <split>annot/<id>.png with values 0..11 (11 = void)."""
    counts = counts or {"train": 3, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    samples: Samples = {}
    for split, n in counts.items():
        for i in range(n):
            item = f"0001TP_{i:06d}"
            image = _image(rng, *size)
            raw = rng.integers(0, 12, size).astype(np.uint8)
            _save(root / split / f"{item}.png", image)
            _save(root / f"{split}annot" / f"{item}.png", raw)
            samples[(split, item)] = (image, np.where(raw == 11, 255, raw).astype(np.uint8))
    return samples
