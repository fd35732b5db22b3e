"""Run identity (method, variant, split, seed), seeding and the facts recorded with every run."""

from __future__ import annotations

import random
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from memseg_bench.errors import UserError


@dataclass(frozen=True)
class RunSpec:
    method: str
    family: str  # the protocol's split family, e.g. "random"
    n_labeled: int
    seed: int
    variant: str | None = None  # memseg ablation

    @property
    def name(self) -> str:
        method = self.method if self.variant is None else f"{self.method}+{self.variant}"
        return f"{method}-n{self.n_labeled}-s{self.seed}"

    def split_family(self, config) -> str:
        """The folder of the split this run trains on (draw `seed` when the family has draws)."""
        suffix = config.split.seed_suffix
        return self.family if suffix is None else self.family + suffix.format(seed=self.seed)


def make_spec(
    method: str, family: str, n_labeled: int, seed: int, variant: str | None = None
) -> RunSpec:
    from memseg_bench.methods import METHODS

    if method not in METHODS:
        raise UserError(f"--method must be one of {sorted(METHODS)}, got {method!r}")
    ablations = METHODS[method].ablations
    if variant is not None and variant not in ablations:
        with_variants = {name: sorted(m.ablations) for name, m in METHODS.items() if m.ablations}
        raise UserError(f"--variant must be one of {with_variants} for --method {method}")
    if n_labeled <= 0:
        raise UserError(f"--n-labeled must be positive, got {n_labeled}")
    if not family or "-" in family or "/" in family:
        raise UserError(f"split.family must be a folder name without '-' or '/', got {family!r}")
    return RunSpec(method, family, n_labeled, seed, variant)


def parse_run_name(name: str, family: str) -> RunSpec:
    try:
        method_part, n_labeled, seed = name.split("-")
        method, _, variant = method_part.partition("+")
        return RunSpec(method, family, int(n_labeled[1:]), int(seed[1:]), variant or None)
    except ValueError:
        raise UserError(f"not a run name: {name!r} (expected METHOD-nN-sSEED)") from None


def config_for_run(config, spec: RunSpec):
    """The run's configuration: an ablation variant sets its dotted config keys."""
    from memseg_bench.config import config_from_dict, config_to_dict
    from memseg_bench.methods import METHODS

    if spec.variant is None:
        return config
    values = config_to_dict(config)
    for dotted, value in METHODS[spec.method].ablations[spec.variant].items():
        *parents, leaf = dotted.split(".")
        section = values
        for key in parents:
            section = section[key]
        if leaf not in section:
            raise KeyError(f"ablation {spec.variant!r}: no config key {dotted!r}")
        section[leaf] = value
    return config_from_dict(values)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device) -> str:
    """The GPU's name, or the CPU's model and the SIMD level torch's kernels use, because CPU
    timings differ by 2x between machines of one kind."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {torch.backends.cpu.get_cpu_capability()}"


def peak_memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {
            "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "memory_kind": "cuda_max_allocated",
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": round(rss_kb / 1024, 1), "memory_kind": "cpu_rss"}
