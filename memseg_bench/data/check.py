"""`memseg data check`: validate a dataset on disk and name the usual preparation mistakes.

Checks the layout, the image counts of the published splits, that every listed image and label
exists, and (for all images, or an evenly spaced sample of `limit` per split) that images decode,
labels are single-channel class-index PNGs of the image's size with values in 0..C-1 or 255.
Recognised mistakes: VOC colour PNGs saved as RGB, missing SBD aug masks, Cityscapes labelIds
where trainIds are expected, JPEG (lossy) label files, also under a .png name. Every problem is
printed on one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memseg_bench.config import DataConfig
from memseg_bench.errors import UserError
from memseg_bench.labels import IGNORE

EXPECTED_COUNTS = {
    "voc": {"train": 10582, "val": 1449},
    "cityscapes": {"train": 2975, "val": 500},
    "camvid": {"train": 367, "val": 101, "test": 233},
}
MAX_LISTED = 5  # missing files named per split before "and N more"
# Cityscapes labelIds of road, sidewalk, building: they dominate a labelIds file, while as
# trainIds 7, 8, 11 are traffic sign, vegetation, person.
_LABELID_MARKERS = (7, 8, 11)


def _sample(ids: list[str], limit: int | None) -> list[str]:
    if limit is None or limit >= len(ids):
        return ids
    if limit <= 0:
        return []
    picks = np.linspace(0, len(ids) - 1, limit).round().astype(int)
    return [ids[i] for i in sorted(set(picks.tolist()))]


def _missing(kind: str, split: str, paths: list[Path]) -> list[str]:
    if not paths:
        return []
    named = ", ".join(str(p) for p in paths[:MAX_LISTED])
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return [f"{split}: {len(paths)} {kind} missing: {named}{more}"]


def _layout_problems(index) -> list[str]:
    if index.name != "voc":
        return []
    from memseg_bench.data.datasets import voc_base

    base = voc_base(index.root)
    if (base / "SegmentationClassAug").is_dir():
        return []
    plain = base / "SegmentationClass"
    count = sum(1 for _ in plain.glob("*.png")) if plain.is_dir() else 0
    if count < EXPECTED_COUNTS["voc"]["train"]:
        return [
            f"{base / 'SegmentationClassAug'} not found and {plain} holds only {count} masks: "
            "the SBD 'aug' masks are missing (train_aug needs 10,582 masks; add "
            "SegmentationClassAug)"
        ]
    return []


def _label_problems(index, label_path: Path, label: np.ndarray) -> list[str]:
    from memseg_bench.data.datasets import invalid_values

    problems = []
    bad = invalid_values(label, index.num_classes)
    name = label_path.name
    if index.name == "cityscapes" and name.endswith("_labelTrainIds.png") and bad:
        problems.append(
            f"label {label_path} has values {bad[:5]} above 18: it holds labelIds, not trainIds "
            "(regenerate *_labelTrainIds.png with cityscapesscripts, or remove them so the "
            "*_labelIds.png files are converted)"
        )
    elif len(bad) > 3:
        problems.append(
            f"label {label_path} has {len(bad)} values outside 0..{index.num_classes - 1} and "
            f"{IGNORE} (e.g. {bad[:5]}): lossy (JPEG) compression or interpolated resizing?"
        )
    elif bad:
        problems.append(
            f"label {label_path} has value {bad[0]} outside the class ids "
            f"0..{index.num_classes - 1} and ignore {IGNORE}"
        )
    return problems


def _check_item(index, split: str, item: str, counts: np.ndarray) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    from memseg_bench.data.datasets import convert_label
    from memseg_bench.fileio import read_image

    image_path, label_path = index.paths(split, item)
    problems = []
    if label_path.suffix.lower() in (".jpg", ".jpeg"):
        problems.append(f"label {label_path} is a JPEG: labels must be lossless PNG class indices")
    try:
        image = read_image(image_path)
    except UserError as error:
        return problems + [str(error)]
    try:
        with Image.open(label_path) as opened:
            mode, encoding = opened.mode, opened.format
            raw = np.asarray(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return problems + [f"cannot read label {label_path}: {error}"]
    if encoding == "JPEG" and not problems:  # JPEG data under a .png name
        return [
            f"label {label_path} holds JPEG data: JPEG compression changes class indices; "
            "labels must be lossless PNG"
        ]
    if mode in ("RGB", "RGBA"):
        return problems + [
            f"label {label_path} is an {mode} colour image: labels must be single-channel class "
            "indices (a VOC colour mask saved as RGB? convert palette colours to indices)"
        ]
    if raw.ndim != 2 or raw.min() < 0 or raw.max() > 255:
        return problems + [f"label {label_path} (mode {mode}) is not an 8-bit class-index image"]
    label = convert_label(index, raw.astype(np.uint8), label_path)
    if label.shape != image.shape[:2]:
        return problems + [
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} but image {image_path} "
            f"is {image.shape[1]}x{image.shape[0]}"
        ]
    problems += _label_problems(index, label_path, label)
    counts += np.bincount(label.ravel(), minlength=256)
    return problems


def _cityscapes_mix_up(index, split: str, counts: np.ndarray, sampled: list[Path]) -> list[str]:
    """trainIds files whose pixels look like labelIds (road/sidewalk/building ids dominating)."""
    if index.name != "cityscapes" or not any(
        p.name.endswith("_labelTrainIds.png") for p in sampled
    ):
        return []
    labelled = counts[:19].sum()
    if labelled == 0:
        return []
    markers = counts[list(_LABELID_MARKERS)].sum() / labelled
    if markers > 0.5 and counts[0] / labelled < 0.05:
        return [
            f"{split}: trainIds 7/8/11 cover {markers:.0%} of the pixels and road (0) almost none: "
            "the *_labelTrainIds.png files look like labelIds"
        ]
    return []


def check_dataset(
    name: str,
    root: str | Path,
    splits: tuple[str, ...] | list[str] | None = None,
    limit: int | None = None,
    progress=None,
) -> tuple[list[str], dict]:
    """(problems, summary). `progress(split, done, total)` is called after every checked image."""
    from memseg_bench.data.datasets import open_dataset

    summary: dict = {"dataset": name, "root": str(root), "splits": {}, "class_names": []}
    try:
        index = open_dataset(DataConfig(name=name, root=str(root)))
        problems = _layout_problems(index)
    except UserError as error:
        return [str(error)], summary
    summary["class_names"] = list(index.class_names)
    for split in splits or index.splits():
        try:
            ids = index.ids(split)
        except UserError as error:
            problems.append(str(error))
            continue
        split_problems = []
        expected = EXPECTED_COUNTS.get(name, {}).get(split)
        if expected is not None and len(ids) != expected:
            split_problems.append(
                f"{split}: {len(ids)} images listed, the published split has {expected}"
            )
        if not ids:
            split_problems.append(f"{split}: no images")
        pairs = [index.paths(split, i) for i in ids]
        split_problems += _missing("images", split, [p for p, _ in pairs if not p.is_file()])
        split_problems += _missing("labels", split, [q for _, q in pairs if not q.is_file()])
        counts = np.zeros(256, np.int64)
        sample = _sample(ids, limit)
        for done, item in enumerate(sample, 1):
            image_path, label_path = index.paths(split, item)
            if image_path.is_file() and label_path.is_file():
                split_problems += _check_item(index, split, item, counts)
            if progress is not None:
                progress(split, done, len(sample))
        split_problems += _cityscapes_mix_up(
            index, split, counts, [index.paths(split, i)[1] for i in sample]
        )
        total = counts.sum()
        summary["splits"][split] = {
            "listed": len(ids),
            "expected": expected,
            "checked": len(sample),
            "problems": len(split_problems),
            "class_share": {
                c: float(counts[k] / total) if total else 0.0
                for k, c in enumerate(index.class_names)
            },
            "ignore_share": float(counts[IGNORE] / total) if total else 0.0,
        }
        problems += split_problems
    return problems, summary


def print_check(
    name: str,
    root: str | Path,
    splits: tuple[str, ...] | list[str] | None = None,
    limit: int | None = None,
    console=None,
) -> list[str]:
    """Run check_dataset with a progress bar; print the summary tables and the problems."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = console or Console()
    with Progress(console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def tick(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"check {split}", total=total)
            bar.update(tasks[split], completed=done)

        problems, summary = check_dataset(name, root, splits, limit, progress=tick)

    table = Table(title=f"{name} dataset at {root}")
    for column in ("split", "images", "expected", "checked", "problems"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in summary["splits"].items():
        expected = "" if info["expected"] is None else str(info["expected"])
        table.add_row(
            split, str(info["listed"]), expected, str(info["checked"]), str(info["problems"])
        )
    console.print(table)
    if summary["splits"]:
        shares = Table(title="class pixel share (checked images)")
        shares.add_column("class")
        for split in summary["splits"]:
            shares.add_column(split, justify="right")
        for k, class_name in enumerate(summary["class_names"]):
            cells = [
                f"{info['class_share'][class_name]:.2%}" for info in summary["splits"].values()
            ]
            shares.add_row(f"{k} {class_name}", *cells)
        shares.add_row(
            "255 ignore", *[f"{i['ignore_share']:.2%}" for i in summary["splits"].values()]
        )
        console.print(shares)
    if problems:
        console.print(f"[bold red]{len(problems)} problem(s):[/]")
        for problem in problems:
            console.print(f"  - {problem}", markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[bold green]no problems found[/]")
    return problems
