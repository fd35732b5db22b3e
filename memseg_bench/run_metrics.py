"""The metrics file of one evaluated run (reports/metrics/<run>.json): one schema, written by the
evaluate stage and read, checked, by the report."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from memseg_bench.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """What makes numbers comparable: cells of two protocols never share a table."""

    dataset: str
    family: str
    arch: str
    backbone: str
    crop: int
    eval_mode: str
    iterations: int
    id: str


@dataclass(frozen=True, kw_only=True)
class Compute:
    wall_time_s: float
    # Labeled training images per second of training time, summed over all ranks.
    images_per_s: float
    peak_memory_mb: float
    memory_kind: str
    device: str
    world_size: int = 1
    torch: str


@dataclass(frozen=True, kw_only=True)
class RunMetrics:
    run: str
    method: str
    variant: str | None
    split: str
    family: str
    n_labeled: int
    seed: int
    behaviour: str
    eval_split: str
    protocol: Protocol
    miou: float  # 0..1, like every score here; the tables print percent
    pixel_accuracy: float
    mean_accuracy: float
    per_class_iou: dict[str, float | None]
    class_names: list[str]
    best_val: dict | None  # {"val_miou", "step", "miou"}: the best-on-val checkpoint's scores
    compute: Compute
    provenance: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _section(path: Path, cls: type, data: object, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{path}: '{prefix.rstrip('.')}' must be an object")
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING
        if required and field.name not in data:
            raise UserError(f"{path}: missing key '{prefix}{field.name}'")
    return data


def check_metrics(path: Path, data: object) -> dict:
    """The file's mapping when it has every key of RunMetrics with a usable value; else a
    UserError naming the file and the key. Unknown keys are kept (later versions may add some)."""
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    _section(path, RunMetrics, data)
    _section(path, Protocol, data["protocol"], "protocol.")
    _section(path, Compute, data["compute"], "compute.")
    problems = {
        "miou": not (_is_number(data["miou"]) and 0 <= data["miou"] <= 1),
        "n_labeled": not _is_int(data["n_labeled"]),
        "seed": not _is_int(data["seed"]),
        "variant": data["variant"] is not None and not isinstance(data["variant"], str),
        "per_class_iou": not isinstance(data["per_class_iou"], dict)
        or not all(v is None or _is_number(v) for v in data["per_class_iou"].values()),
        "behaviour": not isinstance(data["behaviour"], str),
        "class_names": not isinstance(data["class_names"], list),
        "best_val": data["best_val"] is not None
        and not (isinstance(data["best_val"], dict) and _is_number(data["best_val"].get("miou"))),
        "protocol.id": not isinstance(data["protocol"]["id"], str),
        **{
            f"compute.{key}": not _is_number(data["compute"][key])
            for key in ("wall_time_s", "images_per_s", "peak_memory_mb")
        },
    }
    for key, bad in problems.items():
        if bad:
            raise UserError(f"{path}: key '{key}' has an invalid value")
    return data
