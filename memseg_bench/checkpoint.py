"""Atomic checkpoints: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from memseg_bench import torchfile
from memseg_bench.errors import UserError, first_line
from memseg_bench.fileio import atomic_path


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, payload: dict) -> None:
    """A write that fails (a full disk, most often) leaves the previous file as it was."""
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as error:
        reason = first_line(error)
        parent = Path(path).parent
        if parent.is_dir():
            reason += f" ({shutil.disk_usage(parent).free / 2**20:.0f} MiB free there)"
        raise UserError(f"cannot write {path}: {reason}") from None


def load(path: str | Path, map_location="cpu") -> dict:
    """Checkpoints hold tensors, numbers, strings and RNG states; numpy's RNG state needs its
    reconstruction globals allow-listed for weights_only loading."""
    core = getattr(np, "_core", None) or np.core
    safe = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype("uint32"))]
    return torchfile.load(path, "checkpoint", map_location=map_location, allowed=safe)
