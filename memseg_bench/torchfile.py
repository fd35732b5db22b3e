"""Reading torch files (checkpoints, model files, weights files) without running code in them.

`torch.load(weights_only=True)` refuses a pickled Python object other than tensors and plain data,
but its error advises loading again with weights_only=False, which would run that object's code.
Here the refusal names the file and what it holds instead; torch's advice and warnings are never
shown.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

from memseg_bench.errors import UserError, first_line

# What each kind of file is, for "<file> is not <that>".
KINDS = {
    "checkpoint": "a memseg_bench checkpoint",
    "model file": "a memseg_bench model file",
    "weights file": "a weights file (a state dict of tensors)",
}
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _reason(error: BaseException) -> str:
    """Why a file was refused, in words that never suggest loading it unsafely."""
    import pickle

    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        found = _GLOBAL.search(text)
        held = f"the Python object {found.group(1)}" if found else "Python objects"
        return f"it holds {held}, and only tensors and plain data are loaded"
    if isinstance(error, EOFError):
        return "it ends early (empty or truncated)"
    detail = first_line(error).split(". ")[0]  # torch's further sentences guess at causes
    if isinstance(error, zipfile.BadZipFile) or "zip archive" in text:
        return f"it is truncated or in another format ({detail})"
    return f"it cannot be read ({detail})"


def load(
    path: str | Path,
    kind: str,
    map_location="cpu",
    allowed: Sequence = (),
    mmap: bool = False,
    label: str = "",
):
    """The file's content, loaded weights-only with `allowed` globals; else one-line UserError.

    `mmap` maps the tensors instead of reading them (torch's zip format only; ignored for older
    files). `label` prefixes the message (e.g. the params key that named the file)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{label} file not found: {path}" if label else f"{kind} not found: {path}")
    prefix = f"{label} " if label else f"{kind} "
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
            warnings.simplefilter("ignore")
            return torch.load(
                path,
                map_location=map_location,
                weights_only=True,
                mmap=mmap and zipfile.is_zipfile(path),
            )
    except Exception as error:  # noqa: BLE001 - every failure means "not a file we can use"
        raise UserError(f"{prefix}{path} is not {KINDS[kind]}: {_reason(error)}") from None


def check(path: str | Path, kind: str, label: str = "") -> None:
    """Refuse an unsafe or unreadable file before a loader that would word it as torch does.
    Tensors are memory-mapped, not read."""
    load(path, kind, mmap=True, label=label)


def check_weights_option(weights: str | None) -> None:
    """`model.weights` naming a local file: refuse it here if it is unsafe or unreadable."""
    from memseg_bench.models.backbones import PACKAGED_WEIGHTS

    if weights is None or weights in PACKAGED_WEIGHTS or not Path(weights).is_file():
        return  # packaged, or absent: the model builder names a missing file itself
    check(weights, "weights file", label="model.weights:")
