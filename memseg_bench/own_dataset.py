"""`memseg init`: from a dataset folder in the generic layout to a benchmark pipeline of its own.

It checks the folder, writes pipelines/<name>/params.yaml (a preset plus the dataset, the label
counts and the sweep), draws one nested split family per seed (splits/<name>/random_s<K>/, all
label counts and the full train set) and writes pipelines/<name>/dvc.yaml, whose stages run from
the repository root, train into runs_<name>/ and write tables to reports/<name>/.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import yaml

from memseg_bench.errors import UserError, problems_error
from memseg_bench.fileio import write_text

PIPELINES_ROOT = Path("pipelines")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")

# The stages of a dataset's own pipeline. @NAME@ and @PRESET@ are filled in; ${...} is DVC's.
PIPELINE_TEMPLATE = """\
# The sweep of the @NAME@ protocol (preset @PRESET@; the sweep is in params.yaml beside this file),
# as `memseg init` writes it. Every stage runs from the repository root: dvc repro
# pipelines/@NAME@/dvc.yaml trains into runs_@NAME@/ and writes its results to reports/@NAME@/.
stages:
  prepare:
    wdir: ../..
    cmd: memseg prepare --params pipelines/@NAME@/params.yaml --prepared data/@NAME@.prepared.json
    deps:
      - memseg_bench/prepare.py
      - memseg_bench/data
      - memseg_bench/presets/@PRESET@.yaml
      - splits/@NAME@
    params:
      - pipelines/@NAME@/params.yaml:
          - preset
          - data
          - split
          - sweep
      # The protocol's values, so that `dvc params diff` and `dvc exp show` list them.
      - memseg_bench/presets/@PRESET@.yaml:
    outs:
      - data/@NAME@.prepared.json

  train:
    matrix:
      method: ${sweep.methods}
      n: ${sweep.n_labeled}
      seed: ${sweep.seeds}
    wdir: ../..
    cmd: >-
      memseg train --method ${item.method} --n-labeled ${item.n} --seed ${item.seed}
      --params pipelines/@NAME@/params.yaml --runs-dir runs_@NAME@
      --curves-dir reports/@NAME@/curves
    deps: &train_deps
      - data/@NAME@.prepared.json
      - memseg_bench/presets/@PRESET@.yaml
      - memseg_bench/engine.py
      - memseg_bench/runs.py
      - memseg_bench/checkpoint.py
      - memseg_bench/distributed.py
      - memseg_bench/config.py
      - memseg_bench/scoring.py
      - memseg_bench/metrics.py
      - memseg_bench/labels.py
      - memseg_bench/timing.py
      - memseg_bench/methods
      - memseg_bench/models
      - memseg_bench/data
    params: &train_params
      - pipelines/@NAME@/params.yaml:
          - preset
          - data
          - split
          - model
          - train
          - methods
          - evaluate
      - memseg_bench/presets/@PRESET@.yaml:
    outs:
      - runs_@NAME@/${item.method}-n${item.n}-s${item.seed}
      - reports/@NAME@/curves/${item.method}-n${item.n}-s${item.seed}.csv:
          cache: false

  train_full:
    foreach: ${sweep.full_seeds}
    do:
      wdir: ../..
      cmd: >-
        memseg train --method supervised --n-labeled ${sweep.full_n_labeled} --seed ${item}
        --params pipelines/@NAME@/params.yaml --runs-dir runs_@NAME@
        --curves-dir reports/@NAME@/curves
      deps: *train_deps
      params: *train_params
      outs:
        - runs_@NAME@/supervised-n${sweep.full_n_labeled}-s${item}
        - reports/@NAME@/curves/supervised-n${sweep.full_n_labeled}-s${item}.csv:
            cache: false

  evaluate:
    matrix:
      method: ${sweep.methods}
      n: ${sweep.n_labeled}
      seed: ${sweep.seeds}
    wdir: ../..
    cmd: >-
      memseg evaluate --run runs_@NAME@/${item.method}-n${item.n}-s${item.seed}
      --metrics-dir reports/@NAME@/metrics
    deps:
      - runs_@NAME@/${item.method}-n${item.n}-s${item.seed}
      - memseg_bench/evaluate_stage.py
      - memseg_bench/scoring.py
      - memseg_bench/metrics.py
    outs:
      - reports/@NAME@/metrics/${item.method}-n${item.n}-s${item.seed}.json:
          cache: false
      - reports/@NAME@/metrics/${item.method}-n${item.n}-s${item.seed}.per_class.csv:
          cache: false

  evaluate_full:
    foreach: ${sweep.full_seeds}
    do:
      wdir: ../..
      cmd: >-
        memseg evaluate --run runs_@NAME@/supervised-n${sweep.full_n_labeled}-s${item}
        --metrics-dir reports/@NAME@/metrics
      deps:
        - runs_@NAME@/supervised-n${sweep.full_n_labeled}-s${item}
        - memseg_bench/evaluate_stage.py
        - memseg_bench/scoring.py
        - memseg_bench/metrics.py
      outs:
        - reports/@NAME@/metrics/supervised-n${sweep.full_n_labeled}-s${item}.json:
            cache: false
        - reports/@NAME@/metrics/supervised-n${sweep.full_n_labeled}-s${item}.per_class.csv:
            cache: false

  report:
    wdir: ../..
    cmd: >-
      memseg report --params pipelines/@NAME@/params.yaml --metrics-dir reports/@NAME@/metrics
      --out-dir reports/@NAME@ --runs-dir runs_@NAME@
    deps:
      - reports/@NAME@/metrics
      - reports/@NAME@/curves
      - runs_@NAME@
      - memseg_bench/tables.py
      - memseg_bench/report_stage.py
      - memseg_bench/protocol_checks.py
      - memseg_bench/figures.py
    params:
      - pipelines/@NAME@/params.yaml:
          - report
    outs:
      - reports/@NAME@/tables:
          cache: false
      - reports/@NAME@/figures:
          cache: false
    metrics:
      - reports/@NAME@/summary.json:
          cache: false
"""


def pipeline_yaml(name: str, preset: str) -> str:
    return PIPELINE_TEMPLATE.replace("@NAME@", name).replace("@PRESET@", preset)


def label_counts(values: list[str], n_train: int) -> list[int]:
    """'1/8', '0.25' (fractions of the train images) or '46' (a count) -> sorted counts, each
    leaving at least one unlabeled image."""
    counts = set()
    for value in values:
        try:
            number = Fraction(value)
        except (ValueError, ZeroDivisionError):
            raise UserError(
                f"--labeled {value!r}: expected a count (46) or a fraction (1/8, 0.125)"
            ) from None
        count = round(number * n_train) if "/" in value or "." in value else int(number)
        if not 0 < count < n_train:
            raise UserError(
                f"--labeled {value!r} gives {count} labeled images; it must leave 1..{n_train - 1} "
                f"of the {n_train} train images labeled"
            )
        counts.add(count)
    return sorted(counts)


def _overrides(settings: list[str]) -> dict:
    """['train.iterations=2000', ...] -> a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        parts = key.split(".")
        if not equals or not all(parts):
            raise UserError(f"--set {setting!r}: expected SECTION.KEY=VALUE, e.g. train.lr=0.01")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {setting!r}: {part} is set to a value already")
        node[parts[-1]] = yaml.safe_load(value)
    return nested


def init_dataset(
    root: Path,
    name: str,
    preset: str = "camvid",
    labeled: tuple[str, ...] = ("1/8",),
    seeds: int = 3,
    settings: tuple[str, ...] = (),
    pipelines_root: Path = PIPELINES_ROOT,
) -> dict:
    """Check the dataset at `root`, write its params, splits and pipeline; returns what was
    written and the command that runs the benchmark."""
    from memseg_bench.config import config_from_dict, deep_merge
    from memseg_bench.data.check import check_dataset
    from memseg_bench.prepare import SPLITS_ROOT, draw_family

    if not _NAME.match(name):
        raise UserError(f"--name {name!r}: use lower-case letters, digits and '_'")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: at least one seed (one split draw each)")
    folder = pipelines_root / name
    if folder.exists():
        raise UserError(f"{folder} exists already; choose another --name or remove it yourself")
    problems, check = check_dataset("folder", root)
    if problems:
        raise problems_error(problems)
    found = check["splits"]
    if "train" not in found or "test" not in found:
        raise UserError(f"data.root {root}: the folder layout needs images/train and images/test")
    n_train = found["train"]["listed"]
    counts = label_counts(list(labeled), n_train)
    seed_list = list(range(seeds))
    params = {
        "preset": preset,
        "data": {"name": "folder", "root": str(root)},
        "split": {
            "dataset": name,
            "family": "random",
            "seed_suffix": "_s{seed}",
            "n_labeled": counts + [n_train],
        },
        "model": {},
        "train": {} if "val" in found else {"val_every": 0},
        "methods": {},
        "evaluate": {"split": "test"},
        "sweep": {
            "methods": ["supervised", "selftrain", "memseg"],
            "n_labeled": counts,
            "seeds": seed_list,
            "full_n_labeled": n_train,
            "full_seeds": seed_list,
            "ablations": [],
            "ablation_n_labeled": counts[0],
            "ablation_seeds": [],
        },
        "export": {"run": f"memseg-n{counts[0]}-s0"},
        "report": {},
    }
    params = deep_merge(params, _overrides(list(settings)))
    config = config_from_dict(params)  # unknown keys, bad values and unknown presets stop here
    if (SPLITS_ROOT / name).exists():
        raise UserError(f"{SPLITS_ROOT / name} exists already; choose another --name")
    for seed in seed_list:
        draw_family(config, f"random_s{seed}", counts + [n_train], seed)
    header = (
        f"# The {name} protocol: preset {preset} on the folder dataset at {root}, written by\n"
        f"#   memseg init {root} --name {name} --preset {preset} "
        + " ".join(f"--labeled {v}" for v in labeled)
        + f" --seeds {seeds}"
        + "".join(f" --set {s}" for s in settings)
        + "\n# Run seed K trains on the split draw splits/"
        + f"{name}/random_sK. Edit the sweep here; values of the preset are overridden per key.\n"
    )
    write_text(folder / "params.yaml", header + yaml.safe_dump(params, sort_keys=False))
    write_text(folder / "dvc.yaml", pipeline_yaml(name, preset))
    return {
        "params": folder / "params.yaml",
        "pipeline": folder / "dvc.yaml",
        "splits": SPLITS_ROOT / name,
        "label_counts": counts,
        "train_images": n_train,
        "command": f"dvc repro {folder / 'dvc.yaml'}",
        "tables": Path("reports") / name / "tables",
    }
