"""ONNX Runtime sessions tuned for the machine they run on: onnxruntime and the standard library
only, so that `memseg predict` stays free of torch.

Providers are always explicit; `providers_for` picks CUDA (with the CPU behind it) when this
onnxruntime build offers it. The CPU options below are the ones `memseg bench infer --tuning`
measured; see the README's inference section for the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from memseg_bench.errors import UserError, first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": [CPU], "cuda": [CUDA, CPU]}


def machine_threads() -> int:
    """CPU cores this process may run on (its affinity mask, not the host's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call on this platform
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Tuning:
    """Session options; the defaults are the measured choice for the CPU."""

    threads: int = 0  # intra-op threads; 0: machine_threads()
    optimization: str = "all"  # basic | extended | all (all adds the NCHWc layout transforms)
    # Worker threads spin while waiting for work. Spinning only pays when nothing else needs the
    # cores; predict's decode and write threads do.
    spinning: bool = True
    memory_arena: bool = True
    memory_pattern: bool = True
    parallel: bool = False  # ORT_PARALLEL runs independent branches at once (inter-op threads)


OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")


def session_options(tuning: Tuning = Tuning()):
    import onnxruntime as ort

    if tuning.threads < 0:
        raise UserError(
            f"--threads must be 0 (all cores of this process) or more, got {tuning.threads}"
        )
    if tuning.optimization not in OPTIMIZATION_LEVELS:
        raise UserError(f"optimization level must be one of {list(OPTIMIZATION_LEVELS)}")
    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = levels[tuning.optimization]
    options.intra_op_num_threads = tuning.threads or machine_threads()
    options.inter_op_num_threads = options.intra_op_num_threads if tuning.parallel else 1
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if tuning.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    options.enable_cpu_mem_arena = tuning.memory_arena
    options.enable_mem_pattern = tuning.memory_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(tuning.spinning)))
    return options


def providers_for(provider: str) -> list[str]:
    """auto | cpu | cuda as the explicit provider list onnxruntime is given."""
    import onnxruntime as ort

    if provider not in ("auto", *PROVIDERS):
        raise UserError(f"--provider must be auto, cpu or cuda, got {provider!r}")
    if provider == "auto":
        return PROVIDERS["cuda" if CUDA in ort.get_available_providers() else "cpu"]
    return PROVIDERS[provider]


def create_session(path: str | Path, providers: Sequence[str], tuning: Tuning = Tuning()):
    """An InferenceSession on `path` with explicit providers; bad files are one-line errors."""
    import onnxruntime as ort

    providers = list(providers)
    if CUDA in providers:
        # A CUDA build without usable CUDA libraries logs loud errors before falling back to the
        # CPU; the provider that actually runs is printed by the callers instead.
        ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(tuning), providers=providers
        )
    except UserError:
        raise
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        raise UserError(f"model {path} is not a valid ONNX model: {first_line(error)}") from None
    finally:
        ort.set_default_logger_severity(2)
