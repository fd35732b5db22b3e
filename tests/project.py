"""A tiny project folder (params, embedded dataset, splits) for end-to-end CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY_PARAMS = {
    "preset": "embedded",
    "data": {"synthetic": {"n_train": 24, "n_val": 4, "n_test": 4, "size": 32}},
    "split": {"n_labeled": [6], "seed_suffix": None, "n_unlabeled": None},
    "train": {
        "iterations": 16,
        "crop": 32,
        "batch_labeled": 2,
        "batch_unlabeled": 2,
        "log_every": 2,
        "checkpoint_every": 4,
        "val_every": 8,
    },
    "methods": {"memseg": {"memory_start": 2, "contrastive_start": 4}},
    "sweep": {
        "methods": ["supervised", "selftrain", "memseg"],
        "n_labeled": [6],
        "seeds": [0],
        "full_n_labeled": 24,
        "full_seeds": [0],
        "ablations": [],
        "ablation_n_labeled": 6,
        "ablation_seeds": [],
    },
    "export": {"run": "memseg-n6-s0", "parity_sizes": [[32, 32], [48, 40]]},
}


def memseg(cwd: Path, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "memseg_bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"memseg {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def make_project(root: Path, params: dict | None = None, draw: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params or TINY_PARAMS))
    if draw:
        memseg(root, "splits", "draw", "--n", "6", "--n", "24", "--seed", "0")
    return root


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The single `error: ...` stderr line of a command that exited 1, holding every needle."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
