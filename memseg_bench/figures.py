"""Figures of the report: training curves, memory-bank and pseudo-label diagnostics, a
qualitative grid.

matplotlib is imported inside the functions and used through its object API with the Agg canvas
(no pyplot, no global backend switch). Every PNG is written atomically.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError
from memseg_bench.fileio import atomic_path
from memseg_bench.labels import IGNORE

METHOD_COLOURS = {
    "supervised": "#7f7f7f",
    "fixmatch": "#2ca02c",
    "unimatch": "#9467bd",
    "selftrain": "#1f77b4",
    "memseg": "#d62728",
}
_OTHER_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e")
_STYLES = ("-", "--", ":", "-.")
_RUN = re.compile(r"^(?P<method>[^-]+)-n(?P<n>\d+)-s(?P<seed>\d+)$")


# -- reading curves ------------------------------------------------------------------------------


def read_curve(path: Path) -> dict[str, np.ndarray]:
    """Columns of a curve CSV as float arrays; empty cells become NaN."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise UserError(f"cannot read curve {path}: {error}") from None
    if not rows or "step" not in rows[0]:
        raise UserError(f"curve {path} has no 'step' column or no rows")
    columns: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = []
        for row in rows:
            cell = (row.get(key) or "").strip()
            try:
                values.append(float(cell) if cell else math.nan)
            except ValueError:
                raise UserError(f"curve {path}: column {key!r} holds {cell!r}") from None
        columns[key] = np.asarray(values, dtype=np.float64)
    return columns


def _runs(curves_dir: Path, suffix: str, include_variants: bool) -> dict[str, list[Path]]:
    """Curve files grouped by run name without its seed ("memseg-n20"), sorted."""
    if not curves_dir.is_dir():
        raise UserError(f"curves folder not found: {curves_dir}")
    groups: dict[str, list[Path]] = {}
    for path in sorted(curves_dir.glob(f"*{suffix}")):
        name = path.name[: -len(suffix)]
        match = _RUN.match(name)
        if match is None or (suffix == ".csv" and name.endswith(".bank")):
            continue
        if "+" in match["method"] and not include_variants:
            continue
        groups.setdefault(f"{match['method']}-n{match['n']}", []).append(path)
    return groups


def _seed_mean(curves: list[dict[str, np.ndarray]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the mean over seeds at each step (seeds missing a value at a step are skipped)."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        if column not in curve:
            continue
        for step, value in zip(curve["step"], curve[column], strict=True):
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = np.asarray(sorted(by_step), dtype=np.float64)
    return steps, np.asarray([np.mean(by_step[s]) for s in steps], dtype=np.float64)


def _smooth(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 15)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _style(groups: Sequence[str]) -> dict[str, dict]:
    """Colour per method, line style per label count."""
    methods = sorted({g.rsplit("-n", 1)[0] for g in groups})
    counts = sorted({int(g.rsplit("-n", 1)[1]) for g in groups})
    others = iter(_OTHER_COLOURS * 4)
    colours = {m: METHOD_COLOURS.get(m) or next(others) for m in methods}
    return {
        g: {
            "color": colours[g.rsplit("-n", 1)[0]],
            "linestyle": _STYLES[counts.index(int(g.rsplit("-n", 1)[1])) % len(_STYLES)],
        }
        for g in groups
    }


def _order(groups: dict) -> list[str]:
    rank = {m: i for i, m in enumerate(METHOD_COLOURS)}

    def key(group: str) -> tuple:
        method, n = group.rsplit("-n", 1)
        return (rank.get(method.split("+")[0], 99), method, int(n))

    return sorted(groups, key=key)


def _save(figure, out_png: str | Path, dpi: int = 100) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return out_png


def _placeholder(message: str, out_png: str | Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 2))
    figure.text(0.5, 0.5, message, ha="center", va="center")
    return _save(figure, out_png)


# -- figures -------------------------------------------------------------------------------------


def training_curves(
    curves_dir: str | Path, out_png: str | Path, include_variants: bool = False
) -> Path:
    """Training loss (raw, faint, and smoothed) and validation mIoU when logged, per method and
    label count, averaged over seeds."""
    from matplotlib.figure import Figure

    curves_dir = Path(curves_dir)
    groups = _runs(curves_dir, ".csv", include_variants)
    if not groups:
        raise UserError(f"curves folder {curves_dir} holds no <run>.csv training curves")
    curves = {g: [read_curve(p) for p in paths] for g, paths in groups.items()}
    has_val = any(
        "val_miou" in c and np.isfinite(c["val_miou"]).any() for cs in curves.values() for c in cs
    )
    figure = Figure(figsize=(11 if has_val else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    styles = _style(list(groups))
    for group in _order(groups):
        seeds = len(curves[group])
        label = f"{group} ({seeds} seed{'s' if seeds > 1 else ''})"
        steps, loss = _seed_mean(curves[group], "loss")
        if len(steps):
            axes[0].plot(steps, loss, color=styles[group]["color"], alpha=0.2, linewidth=0.8)
            axes[0].plot(steps, _smooth(loss), label=label, **styles[group])
        if has_val:
            steps, val = _seed_mean(curves[group], "val_miou")
            if len(steps):
                axes[1].plot(
                    steps, 100 * val, marker="o", markersize=3, label=label, **styles[group]
                )
    axes[0].set(title="training loss (mean over seeds)", xlabel="iteration", ylabel="loss")
    if all((_seed_mean(cs, "loss")[1] > 0).all() for cs in curves.values()):
        axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    if has_val:
        axes[1].set(
            title="validation mIoU (mean over seeds)", xlabel="iteration", ylabel="mIoU (%)"
        )
        axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(figure, out_png)


def bank_diagnostics(
    curves_dir: str | Path, out_png: str | Path, include_variants: bool = False
) -> Path:
    """Per row (method and label count): filled memory slots per class over training, and the
    share of candidate pixels that passed the feature quality filter."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    curves_dir = Path(curves_dir)
    groups = _runs(curves_dir, ".bank.csv", include_variants)
    if not groups:
        groups = _runs(curves_dir, ".bank.csv", True)
    if not groups:
        return _placeholder(f"no memory-bank runs in {curves_dir}", out_png)
    order = _order(groups)
    figure = Figure(figsize=(13, 3.4 * len(order)), layout="constrained")
    axes = figure.subplots(len(order), 2, squeeze=False, sharex="row")
    for row, group in enumerate(order):
        banks = [read_curve(p) for p in groups[group]]
        mains = [
            read_curve(p.with_name(p.name[: -len(".bank.csv")] + ".csv"))
            for p in groups[group]
            if p.with_name(p.name[: -len(".bank.csv")] + ".csv").is_file()
        ]
        classes = [k for k in banks[0] if k != "step"]
        cmap = colormaps["tab20" if len(classes) > 10 else "tab10"]
        seeds = f"{len(banks)} seed{'s' if len(banks) > 1 else ''}"
        fill_ax, pass_ax = axes[row]
        for i, name in enumerate(classes):
            steps, fill = _seed_mean(banks, name)
            fill_ax.plot(steps, fill, color=cmap(i % cmap.N), label=name)
        fill_ax.set(
            title=f"{group} ({seeds}): memory slots filled per class",
            xlabel="iteration",
            ylabel="filled slots",
        )
        fill_ax.legend(fontsize=7, ncol=2 if len(classes) > 10 else 1, loc="center left",
                       bbox_to_anchor=(1.0, 0.5))  # fmt: skip
        steps, rate = _seed_mean(mains, "filter_pass_rate")
        if len(steps):
            pass_ax.plot(steps, 100 * rate, color=METHOD_COLOURS["memseg"], alpha=0.3)
            pass_ax.plot(steps, 100 * _smooth(rate), color=METHOD_COLOURS["memseg"])
            pass_ax.set_ylim(-2, 102)
        else:
            pass_ax.text(0.5, 0.5, "no filter_pass_rate logged", ha="center",
                         transform=pass_ax.transAxes)  # fmt: skip
        pass_ax.set(
            title=f"{group}: quality-filter pass rate",
            xlabel="iteration",
            ylabel="pass rate (%)",
        )
        for ax in (fill_ax, pass_ax):
            ax.grid(alpha=0.3)
    return _save(figure, out_png)


def method_diagnostics(curves_dir: str | Path, out_png: str | Path) -> Path:
    """Why a semi-supervised method gains or does not: per method and label count, the
    pseudo-labels' accuracy against the hidden ground truth of the unlabeled images, their mean
    confidence and (FixMatch, UniMatch) the share of pixels above the threshold, and every loss
    term over training, averaged over seeds."""
    from matplotlib.figure import Figure

    curves_dir = Path(curves_dir)
    groups = {}
    for group, paths in _runs(curves_dir, ".csv", False).items():
        curves = [read_curve(path) for path in paths]
        if any("pseudo_accuracy" in curve for curve in curves):
            groups[group] = curves
    if not groups:
        return _placeholder(f"no runs with pseudo-labels in {curves_dir}", out_png)
    order = _order(groups)
    styles = _style(order)
    figure = Figure(figsize=(12, 3.6 * len(order)), layout="constrained")
    axes = figure.subplots(len(order), 2, squeeze=False)
    for row, group in enumerate(order):
        curves = groups[group]
        seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
        quality_ax, loss_ax = axes[row]
        columns = (("pseudo_accuracy", "-"), ("pseudo_confidence", ":"), ("pseudo_above_tau", "--"))
        for column, style in columns:
            if not all(column in curve for curve in curves):
                continue
            steps, values = _seed_mean(curves, column)
            colour, label = styles[group]["color"], column.replace("_", " ")
            quality_ax.plot(
                steps, 100 * _smooth(values), linestyle=style, color=colour, label=label
            )
        quality_ax.set(
            title=f"{group} ({seeds}): pseudo-labels on unlabeled images",
            xlabel="iteration",
            ylabel="%",
        )
        terms = sorted({k for c in curves for k in c if k.startswith("loss_")})
        for i, term in enumerate(terms):
            steps, values = _seed_mean(curves, term)
            colour = _OTHER_COLOURS[i % len(_OTHER_COLOURS)]
            loss_ax.plot(steps, _smooth(values), color=colour, label=term[len("loss_") :])
        loss_ax.set(
            title=f"{group}: loss terms (weighted, as optimised)",
            xlabel="iteration",
            ylabel="value",
        )
        if all((_seed_mean(curves, t)[1] > 0).all() for t in terms):
            loss_ax.set_yscale("log")
        for ax in (quality_ax, loss_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(figure, out_png)


def ignore_colour(palette: Sequence[Sequence[int]], num_classes: int) -> tuple[int, int, int]:
    """Black, unless a class already uses black (then white, then magenta)."""
    used = {tuple(int(v) for v in colour) for colour in palette[:num_classes]}
    for colour in ((0, 0, 0), (255, 255, 255), (255, 0, 255)):
        if colour not in used:
            return colour
    return (0, 0, 0)


def colour_mask(
    mask: np.ndarray, palette: Sequence[Sequence[int]], ignore: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """Class-index mask (H, W) -> RGB uint8 with the dataset palette; 255 (ignore) in `ignore`."""
    mask = np.asarray(mask)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut[255] = ignore
    unknown = (mask >= len(palette)) & (mask != IGNORE)
    if unknown.any():
        raise ValueError(f"mask holds class ids beyond the {len(palette)}-colour palette")
    return lut[mask.astype(np.uint8)]


def qualitative_grid(
    rows: Sequence[dict],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    out_png: str | Path,
    cell_px: int = 200,
) -> dict:
    """Columns image | ground truth | one per method (in the order given), one row per image;
    masks in the dataset palette, ignore (255) in black (white when a class is black); a legend
    of class colours below. Returns the layout: image size and each cell's pixel box
    (x0, y0, x1, y1) keyed "row,column"."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not rows:
        raise ValueError("qualitative_grid needs at least one row")
    if len(palette) < len(class_names):
        raise ValueError(f"palette has {len(palette)} colours for {len(class_names)} classes")
    methods = list(dict.fromkeys(m for row in rows for m in row["predictions"]))
    ignore = ignore_colour(palette, len(class_names))
    columns = ["image", "ground truth", *methods]
    dpi, gap, top = 100, 6, 30  # pixels
    heights = [round(cell_px * r["label"].shape[0] / r["label"].shape[1]) for r in rows]
    width = len(columns) * cell_px + (len(columns) + 1) * gap
    legend_cols = max(1, min(len(class_names) + 1, width // 150))
    legend_h = 22 * math.ceil((len(class_names) + 1) / legend_cols) + 16
    height = top + sum(heights) + len(rows) * gap + legend_h
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    cells = {}
    y = top
    for r, (row, cell_h) in enumerate(zip(rows, heights, strict=True)):
        panels = [row["image"], colour_mask(row["label"], palette, ignore)]
        panels += [
            colour_mask(row["predictions"][m], palette, ignore) if m in row["predictions"] else None
            for m in methods
        ]
        for c, (name, panel) in enumerate(zip(columns, panels, strict=True)):
            x = gap + c * (cell_px + gap)
            ax = figure.add_axes((x / width, 1 - (y + cell_h) / height, cell_px / width,
                                  cell_h / height))  # fmt: skip
            ax.set_axis_off()
            if panel is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(panel, interpolation="nearest", aspect="auto")
            if r == 0:
                ax.set_title(name, fontsize=11)
            cells[f"{r},{name}"] = (x, y, x + cell_px, y + cell_h)
        y += cell_h + gap
    handles = [
        Patch(facecolor=np.asarray(palette[i]) / 255, edgecolor="0.5", label=name)
        for i, name in enumerate(class_names)
    ]
    handles.append(Patch(facecolor=np.asarray(ignore) / 255, edgecolor="0.5", label="ignore"))
    figure.legend(handles=handles, loc="lower center", ncol=legend_cols, frameon=False,
                  fontsize=9, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    _save(figure, out_png, dpi=dpi)
    return {"size": (width, height), "cells": cells}
