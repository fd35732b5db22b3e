"""Dataset readers for the published layouts: ids per split, file paths, and validated samples.

Layouts (data.name): synthetic / folder (images/<split>/<id>.<png|jpg>, labels/<split>/<id>.png,
classes.json, optional <split>.txt), voc (VOC2012 + SBD aug masks), cityscapes (leftImg8bit +
gtFine, labelIds converted to trainIds), camvid (SegNet layout, 11 classes, void 11 -> 255).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memseg_bench.config import DataConfig
from memseg_bench.errors import UserError
from memseg_bench.fileio import read_image, read_label
from memseg_bench.labels import IGNORE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _voc_palette(n: int = 21) -> tuple[tuple[int, int, int], ...]:
    """The standard VOC colour map: bits of the class index spread over the channels."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC_PALETTE = _voc_palette()

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip
# Official Cityscapes labelId of each trainId 0..18; every other labelId is ignored.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_LABELID_TO_TRAINID = np.full(256, IGNORE, np.uint8)
CITYSCAPES_LABELID_TO_TRAINID[list(CITYSCAPES_LABEL_IDS)] = np.arange(19, dtype=np.uint8)

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CAMVID_VOID = 11

# Lists shipped with the project (splits/voc/...), used when the VOC root has no train_aug list.
SHIPPED_SPLITS = Path(__file__).resolve().parents[2] / "splits"


@dataclass(frozen=True)
class DatasetIndex:
    """Where the images and labels of a dataset are; ids are read lazily and cached."""

    name: str
    root: Path
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> list[str]:
        """The splits present on disk."""
        return _LAYOUTS[self.name]["splits"](self)

    def ids(self, split: str) -> list[str]:
        return list(self._entries(split))

    def paths(self, split: str, item: str) -> tuple[Path, Path]:
        entries = self._entries(split)
        if item not in entries:
            raise UserError(f"data.root {self.root}: no image {item!r} in split {split!r}")
        return entries[item]

    def _entries(self, split: str) -> dict[str, tuple[Path, Path]]:
        if split not in self._cache:
            self._cache[split] = _LAYOUTS[self.name]["entries"](self, split)
        return self._cache[split]


# -- layouts -------------------------------------------------------------------------------


def _need_dir(path: Path, root: Path, layout: str) -> Path:
    if not path.is_dir():
        raise UserError(f"data.root {root}: folder {path} not found ({layout} layout)")
    return path


def _read_list(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _stems(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in extensions and stem not in found:
                found[stem] = Path(entry.path)
    return found


def _folder_splits(index: DatasetIndex) -> list[str]:
    images = index.root / "images"
    if not images.is_dir():
        return []
    return [s for s in ("train", "val", "test") if (images / s).is_dir()]


def _folder_entries(index: DatasetIndex, split: str) -> dict[str, tuple[Path, Path]]:
    root = index.root
    image_dir = _need_dir(root / "images" / split, root, index.name)
    label_dir = _need_dir(root / "labels" / split, root, index.name)
    images = _stems(image_dir, IMAGE_EXTENSIONS)
    listing = root / f"{split}.txt"
    ids = _read_list(listing) if listing.is_file() else sorted(images)
    # A listed id without an image keeps its expected .png path: loading it names the file.
    return {i: (images.get(i, image_dir / f"{i}.png"), label_dir / f"{i}.png") for i in ids}


def voc_base(root: Path) -> Path:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise UserError(f"data.root {root}: folder {root / 'JPEGImages'} not found (voc layout)")


def voc_mask_dir(base: Path) -> Path:
    aug = base / "SegmentationClassAug"
    return aug if aug.is_dir() else base / "SegmentationClass"


def voc_list(base: Path, split: str) -> Path:
    """The id list of a VOC split: 'train' is train_aug (10,582), 'val' the 1,449 val images."""
    names = {"train": ("train_aug.txt", "trainaug.txt"), "val": ("val.txt",)}[split]
    for folder in (base / "ImageSets" / "SegmentationAug", base / "ImageSets" / "Segmentation"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return SHIPPED_SPLITS / "voc" / names[0]


def _voc_splits(index: DatasetIndex) -> list[str]:
    return ["train", "val"]


def _voc_entries(index: DatasetIndex, split: str) -> dict[str, tuple[Path, Path]]:
    if split not in ("train", "val"):
        raise UserError(f"the voc layout has splits train and val, not {split!r}")
    base = voc_base(index.root)
    masks = voc_mask_dir(base)
    _need_dir(masks, index.root, "voc")
    listing = voc_list(base, split)
    if not listing.is_file():
        raise UserError(f"data.root {index.root}: no {split} id list found (looked for {listing})")
    return {i: (base / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in _read_list(listing)}


def _cityscapes_splits(index: DatasetIndex) -> list[str]:
    base = index.root / "leftImg8bit"
    return [s for s in ("train", "val", "test") if (base / s).is_dir()]


def _cityscapes_entries(index: DatasetIndex, split: str) -> dict[str, tuple[Path, Path]]:
    root = index.root
    image_dir = _need_dir(root / "leftImg8bit" / split, root, "cityscapes")
    label_dir = _need_dir(root / "gtFine" / split, root, "cityscapes")
    suffix = "_leftImg8bit.png"
    entries = {}
    for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
        for name in sorted(os.listdir(image_dir / city)):
            if not name.endswith(suffix):
                continue
            stem = name[: -len(suffix)]
            train_ids = label_dir / city / f"{stem}_gtFine_labelTrainIds.png"
            label = (
                train_ids
                if train_ids.is_file()
                else label_dir / city / f"{stem}_gtFine_labelIds.png"
            )
            entries[f"{city}/{stem}"] = (image_dir / city / name, label)
    return entries


def _camvid_splits(index: DatasetIndex) -> list[str]:
    return [s for s in ("train", "val", "test") if (index.root / s).is_dir()]


def _camvid_entries(index: DatasetIndex, split: str) -> dict[str, tuple[Path, Path]]:
    root = index.root
    image_dir = _need_dir(root / split, root, "camvid")
    label_dir = _need_dir(root / f"{split}annot", root, "camvid")
    images = _stems(image_dir, (".png",))
    return {i: (images[i], label_dir / f"{i}.png") for i in sorted(images)}


_LAYOUTS = {
    "synthetic": {"splits": _folder_splits, "entries": _folder_entries},
    "folder": {"splits": _folder_splits, "entries": _folder_entries},
    "voc": {"splits": _voc_splits, "entries": _voc_entries},
    "cityscapes": {"splits": _cityscapes_splits, "entries": _cityscapes_entries},
    "camvid": {"splits": _camvid_splits, "entries": _camvid_entries},
}


def _folder_classes(root: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    path = root / "classes.json"
    try:
        data = json.loads(path.read_text())
        names = tuple(str(n) for n in data["classes"])
        palette = data.get("palette") or [
            [(37 * i) % 256, (91 * i) % 256, (53 * i) % 256] for i in range(len(names))
        ]
        palette = tuple(tuple(int(v) for v in c) for c in palette)
    except FileNotFoundError:
        raise UserError(f"data.root {root}: {path} not found (folder layout)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(
            f"{path}: expected {{'classes': [...], 'palette': [[r, g, b], ...]}} ({error})"
        ) from None
    if not names or len(palette) != len(names) or len(names) > 255:
        raise UserError(f"{path}: needs 1..255 class names and one palette colour per class")
    return names, palette


def open_dataset(data_cfg: DataConfig) -> DatasetIndex:
    """The index of the dataset that `data.name` / `data.root` point at (checks the root only)."""
    name = data_cfg.name
    if name not in _LAYOUTS:
        raise UserError(f"params: 'data.name' must be one of {sorted(_LAYOUTS)}, got {name!r}")
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise UserError(f"data.root: dataset folder not found: {root}")
    if name in ("synthetic", "folder"):
        names, palette = _folder_classes(root)
        _need_dir(root / "images", root, name)
    elif name == "voc":
        voc_base(root)
        names, palette = VOC_CLASSES, VOC_PALETTE
    elif name == "cityscapes":
        _need_dir(root / "leftImg8bit", root, name)
        _need_dir(root / "gtFine", root, name)
        names, palette = CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    else:
        _need_dir(root / "train", root, name)
        names, palette = CAMVID_CLASSES, CAMVID_PALETTE
    return DatasetIndex(name=name, root=root, class_names=names, palette=palette)


# -- samples -------------------------------------------------------------------------------


def convert_label(index: DatasetIndex, label: np.ndarray, label_path: Path) -> np.ndarray:
    """Map a label file's values to class ids 0..C-1 and 255 for the dataset's encoding."""
    if index.name == "cityscapes" and label_path.name.endswith("_labelIds.png"):
        return CITYSCAPES_LABELID_TO_TRAINID[label]
    if index.name == "camvid":
        return np.where(label == CAMVID_VOID, np.uint8(IGNORE), label)
    return label


def invalid_values(label: np.ndarray, num_classes: int) -> list[int]:
    counts = np.bincount(label.ravel(), minlength=256)
    counts[IGNORE] = 0
    counts[:num_classes] = 0
    return [int(v) for v in np.flatnonzero(counts)]


def load_sample(index: DatasetIndex, split: str, item: str) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, label uint8 HxW with class ids and 255); errors name the file."""
    image_path, label_path = index.paths(split, item)
    image = read_image(image_path)
    label = convert_label(index, read_label(label_path), label_path)
    if label.shape != image.shape[:2]:
        raise UserError(
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} "
            f"is {image.shape[1]}x{image.shape[0]}"
        )
    bad = invalid_values(label, index.num_classes)
    if bad:
        raise UserError(
            f"label {label_path} has value {bad[0]} outside the class ids "
            f"0..{index.num_classes - 1} and ignore {IGNORE}"
        )
    return image, label
