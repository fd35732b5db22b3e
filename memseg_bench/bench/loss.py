"""Benchmark of the contrastive term: the closed form against a straightforward pairwise port.

(a) distance part only: `contrastive_loss` vs the per-class |F_c| x |M_c| matrices, forward +
    backward, on labeled and unlabeled pixels, with given (leaf) scores.
(b) the whole term as a training step runs it: feature and memory selectors, the loss on labeled
    and unlabeled pixels, forward + backward; plus the memory bank update (quality filter, teacher
    projection, selector ranking, insertion). The port loops over classes, builds P x N matrices and
    keeps the bank as per-class numpy arrays (a CPU round trip per update). The student's
    projection / prediction heads cost the same in both and are left out: the benchmark's
    features stand for their output.
(c) the whole term of (b) again with the selectors in the form this device does not use by
    default (segmented, sync-free matmuls on the CPU; host-split plain layers elsewhere): which
    form pays off on a device.

Each variant runs in a fresh subprocess on identical seeded inputs; its peak memory is the rise of
the resident set (CPU: VmHWM after resetting it once the inputs exist, else ru_maxrss) or of the
CUDA allocator's peak above what the inputs hold.

    memseg bench loss --preset voc_v3p_r50 --threads 2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from memseg_bench.labels import IGNORE

# Sizes of a DeepLabv3+ step (stride-4 features) of the config preset of the same name: VOC 20 +
# 2x10 crops of 321 (81 x 81 features), Cityscapes 7 + 2x3 crops of 512 (128 x 128), after
# dropping ignored pixels; the embedded protocol's sizes, small enough for tests.
PRESETS = {
    "voc_v3p_r50": {
        "num_classes": 21,
        "labeled": 125_000,
        "unlabeled": 125_000,
        "labeled_all": 131_220,
        "n_labeled": 212,
        "batch_labeled": 20,
        "k_rule": "voc",
        "background": 0.70,
    },
    "cityscapes_v3p_r50": {
        "num_classes": 19,
        "labeled": 110_000,
        "unlabeled": 95_000,
        "labeled_all": 114_688,
        "n_labeled": 100,
        "batch_labeled": 7,
        "k_rule": "cityscapes",
        "background": None,
    },
    # 4 + 2x2 crops of 64 (16 x 16 features), 7 classes
    "embedded": {
        "num_classes": 7,
        "labeled": 1_000,
        "unlabeled": 1_000,
        "labeled_all": 1_024,
        "n_labeled": 5,
        "batch_labeled": 4,
        "k_rule": "cityscapes",
        "background": 0.5,
    },
}
DIM = 256
MEMORY = 256
VARIANTS = ("distance_closed", "distance_pairwise", "term_ours", "term_other_form", "term_pairwise")


@dataclass
class Inputs:
    features: list  # [labeled, unlabeled] student embeddings [P, D], leaves requiring grad
    classes: list  # [labeled, unlabeled] [P] long
    scores: list  # leaf feature scores (distance benchmark)
    memory_scores: object  # leaf [C, N] (distance benchmark)
    bank: dict
    teacher_features: object  # [P_all, D] raw labeled decoder features
    teacher_labels: object  # [P_all] with 255
    teacher_pred: object
    teacher_conf: object


def class_probs(preset: dict, generator):
    """A skewed class distribution: Zipf-like, optionally a dominant background class 0."""
    import torch

    c = preset["num_classes"]
    zipf = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.5
    zipf = zipf[torch.randperm(c, generator=generator)]
    if preset["background"] is not None:
        zipf[0] = 0.0
        zipf = zipf / zipf.sum() * (1 - preset["background"])
        zipf[0] = preset["background"]
    return zipf / zipf.sum()


def build_inputs(preset_name: str, device: str, dtype_name: str, seed: int = 0) -> Inputs:
    import torch
    from torch.nn import functional as F

    preset = PRESETS[preset_name]
    dtype = getattr(torch, dtype_name)
    c = preset["num_classes"]
    gen = torch.Generator().manual_seed(seed)
    probs = class_probs(preset, gen)

    def draw_classes(n):
        return torch.multinomial(probs, n, replacement=True, generator=gen).to(device)

    def leaf(shape, low=None):
        values = torch.randn(shape, generator=gen, dtype=dtype)
        if low is not None:
            values = torch.sigmoid(values).add_(low)
        return values.to(device).requires_grad_()

    features, classes, scores = [], [], []
    for key in ("labeled", "unlabeled"):
        features.append(leaf((preset[key], DIM)))
        classes.append(draw_classes(preset[key]))
        scores.append(leaf((preset[key],), low=0.0))
    bank = {
        "features": F.normalize(torch.randn(c, MEMORY, DIM, generator=gen, dtype=dtype), dim=-1).to(
            device
        ),
        "count": torch.full((c,), MEMORY, dtype=torch.long, device=device),
    }
    total = preset["labeled_all"]
    labels = draw_classes(total)
    labels[torch.rand(total, generator=gen).to(device) < 0.05] = 255
    wrong = torch.rand(total, generator=gen).to(device) < 0.2
    pred = torch.where(wrong, draw_classes(total), labels.clamp(max=c - 1))
    # about 75% of the pixels above the 0.95 threshold: with 80% correct, ~60% are kept
    confident = torch.rand(total, generator=gen) < 0.75
    spread = torch.rand(total, generator=gen)
    conf = torch.where(confident, 0.9501 + 0.0499 * spread, 0.5 + 0.45 * spread).to(device, dtype)
    return Inputs(
        features=features,
        classes=classes,
        scores=scores,
        memory_scores=leaf((c, MEMORY), low=0.0),
        bank=bank,
        teacher_features=torch.randn(total, DIM, generator=gen, dtype=dtype).to(device),
        teacher_labels=labels,
        teacher_pred=pred,
        teacher_conf=conf,
    )


def build_heads(num_classes: int, device: str, dtype_name: str, form: str = "auto"):
    """Student selectors and the teacher's projection + feature selector (eval mode)."""
    import torch

    from memseg_bench.models.heads import ClassSelectors, pixel_head

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    heads = {
        "selectors_feature": ClassSelectors(num_classes, DIM, form),
        "selectors_memory": ClassSelectors(num_classes, DIM, form),
        "teacher_projection": pixel_head(DIM, DIM, form).eval(),
        "teacher_selectors": ClassSelectors(num_classes, DIM, form).eval(),
    }
    return {name: module.to(device=device, dtype=dtype) for name, module in heads.items()}


# -- the two implementations of the whole term -----------------------------------------------------


def term_ours(inputs: Inputs, heads: dict, num_classes: int):
    from memseg_bench.methods.contrastive import contrastive_loss

    bank = inputs.bank
    memory_scores = heads["selectors_memory"].score_all(bank["features"])
    total = 0.0
    for features, classes in zip(inputs.features, inputs.classes, strict=True):
        scores = heads["selectors_feature"](features.detach(), classes)
        total = total + 0.1 * contrastive_loss(
            features, classes, bank["features"], bank["count"], scores, memory_scores, num_classes
        )
    return total


def bank_update_ours(inputs: Inputs, heads: dict, k: int):
    import torch

    from memseg_bench.methods.memory_bank import best_per_class, insert, quality_mask
    from memseg_bench.models.heads import group_ids_where

    with torch.no_grad():
        labels = inputs.teacher_labels
        keep = quality_mask(labels, inputs.teacher_pred, inputs.teacher_conf)
        classes = torch.where(keep, labels, torch.full_like(labels, IGNORE))
        projected = heads["teacher_projection"](inputs.teacher_features, group_ids_where(keep))
        scores = heads["teacher_selectors"](projected, classes)
        best = best_per_class(projected, classes, scores, k, inputs.bank["count"].shape[0], True)
        inputs.bank = insert(inputs.bank, *best, k, "highest")


def numpy_bank(bank: dict) -> list:
    counts = bank["count"].tolist()
    return [
        bank["features"][c, : counts[c]].detach().cpu().numpy().copy() for c in range(len(counts))
    ]


def term_pairwise(inputs: Inputs, heads: dict, num_classes: int, memory_np: list):
    import torch

    from memseg_bench.methods.contrastive_pairwise import class_distance

    device = inputs.features[0].device
    feature_side, memory_side = heads["selectors_feature"].mlp, heads["selectors_memory"].mlp
    total = 0.0
    for features, classes in zip(inputs.features, inputs.classes, strict=True):
        term = features.sum() * 0.0
        for c in torch.unique(classes).tolist():
            mask = classes == c
            rows = features[mask]
            memory = torch.from_numpy(memory_np[c]).to(device)
            if rows.shape[0] < 2 or memory.shape[0] < 2:
                continue
            s_f = torch.sigmoid(feature_side.forward_group(rows.detach(), c))[:, 0]
            s_m = torch.sigmoid(memory_side.forward_group(memory, c))[:, 0]
            term = term + class_distance(rows, memory, s_f, s_m)
        total = total + 0.1 * term / num_classes
    return total


def bank_update_pairwise(inputs: Inputs, heads: dict, k: int, memory_np: list):
    import numpy as np
    import torch

    from memseg_bench.methods.memory_bank import quality_mask

    device = inputs.teacher_features.device
    with torch.no_grad():
        keep = quality_mask(inputs.teacher_labels, inputs.teacher_pred, inputs.teacher_conf)
        classes = inputs.teacher_labels[keep].cpu().numpy()
        projected = heads["teacher_projection"].forward_group(inputs.teacher_features[keep], 0)
        projected = projected.cpu().numpy()
        for c in np.unique(classes).tolist():
            rows = projected[classes == c]
            if rows.shape[0] > k:
                selector = heads["teacher_selectors"].mlp
                rows_t = torch.from_numpy(rows).to(device)
                scores = torch.sigmoid(selector.forward_group(rows_t, c))[:, 0]
                rows = rows[np.argsort(-scores.cpu().numpy(), kind="stable")[:k]]
            memory_np[c] = np.concatenate([rows, memory_np[c]])[:MEMORY]


# -- one variant in this process -----------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the level at start(): CUDA allocator peak, or the resident set's high
    water mark (reset through /proc/self/clear_refs when allowed, else ru_maxrss)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import gc
        import resource

        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            # read after the reset: the high-water mark never falls below a later resident set
            self.base = _rss_kib("VmRSS")
            self.method = "VmHWM (reset) - VmRSS"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss - ru_maxrss after inputs"

    def stop(self) -> float:
        """MiB above the starting level."""
        import resource

        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        if self.method.startswith("VmHWM"):
            rise = _rss_kib("VmHWM") - self.base
        else:
            rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base
        # the kernel's resident-set counters are cached per thread and lag by up to a few hundred
        # KiB, so a variant that allocates nothing new can read slightly below its base
        return max(rise, 0) / 1024


def run_variant(
    variant: str, preset_name: str, threads: int, repeats: int, dtype_name: str, device: str
) -> dict:
    import torch

    from memseg_bench.methods.contrastive import contrastive_loss
    from memseg_bench.methods.contrastive_pairwise import contrastive_loss_pairwise
    from memseg_bench.methods.memory_bank import k_per_class

    torch.set_num_threads(threads)
    form = "auto"
    if variant == "term_other_form":  # the selectors' form this device does not use by default
        form = "segmented" if torch.device(device).type == "cpu" else "split"
    preset = PRESETS[preset_name]
    c = preset["num_classes"]
    inputs = build_inputs(preset_name, device, dtype_name)
    heads = build_heads(c, device, dtype_name, form) if variant.startswith("term") else None
    k = k_per_class(preset["n_labeled"], MEMORY, c, preset["batch_labeled"], preset["k_rule"])
    memory_np = numpy_bank(inputs.bank) if variant == "term_pairwise" else None
    leaves = inputs.features + inputs.scores + [inputs.memory_scores]
    if heads is not None:
        leaves = inputs.features + [p for h in heads.values() for p in h.parameters()]

    def distance(loss_fn):
        total = 0.0
        for features, classes, scores in zip(
            inputs.features, inputs.classes, inputs.scores, strict=True
        ):
            bank = inputs.bank
            total = total + loss_fn(
                features, classes, bank["features"], bank["count"], scores, inputs.memory_scores, c
            )
        return total

    ours = [
        ("loss", lambda: term_ours(inputs, heads, c)),
        ("bank", lambda: bank_update_ours(inputs, heads, k)),
    ]
    steps = {
        "distance_closed": [("loss", lambda: distance(contrastive_loss))],
        "distance_pairwise": [("loss", lambda: distance(contrastive_loss_pairwise))],
        "term_ours": ours,
        "term_other_form": ours,
        "term_pairwise": [
            ("loss", lambda: term_pairwise(inputs, heads, c, memory_np)),
            ("bank", lambda: bank_update_pairwise(inputs, heads, k, memory_np)),
        ],
    }[variant]
    peak = PeakMemory(device)
    peak.start()
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    values = []
    for repeat in range(repeats + 1):  # the first round warms up
        for name, step in steps:
            for leaf in leaves:
                leaf.grad = None
            _sync(device)
            start = time.perf_counter()
            out = step()
            if name == "loss":
                out.backward()
            _sync(device)
            if repeat > 0:
                times[name].append(time.perf_counter() - start)
            if name == "loss" and repeat == 0:
                values.append(float(out.detach()))
    result = {
        "variant": variant,
        "preset": preset_name,
        "device": device,
        "threads": threads,
        "dtype": dtype_name,
        "pixels": [int(f.shape[0]) for f in inputs.features],
        "k": k,
        "loss_value": values[0],
        "peak_mib": peak.stop(),
        "memory_method": peak.method,
    }
    for name, samples in times.items():
        result[f"{name}_s"] = statistics.median(samples)
    result["total_s"] = sum(result[f"{name}_s"] for name in times)
    return result


# -- driver ----------------------------------------------------------------------------------------


def _in_subprocess(variant, preset, threads, repeats, dtype_name, device) -> dict:
    arguments = {"variant": variant, "preset_name": preset, "threads": threads}
    arguments.update(repeats=repeats, dtype_name=dtype_name, device=device)
    command = [sys.executable, "-m", "memseg_bench.bench.loss", json.dumps(arguments)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker {variant} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_loss(
    preset: str = "voc_v3p_r50",
    threads: int = 2,
    repeats: int = 3,
    dtype=None,
    device: str = "cpu",
    variants: tuple[str, ...] = VARIANTS,
) -> dict:
    """Median seconds, peak memory and speed-up ratios of every variant (each in a subprocess)."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    dtype_name = str(dtype or torch.float32).replace("torch.", "")
    # The host's load average before and after: other processes on a small machine distort
    # multi-threaded CPU timings badly, so it is recorded next to them.
    load_before = os.getloadavg()[0]
    results = {v: _in_subprocess(v, preset, threads, repeats, dtype_name, device) for v in variants}
    summary: dict = {
        "preset": preset,
        "threads": threads,
        "device": device,
        "load_average": [load_before, os.getloadavg()[0]],
        "variants": results,
    }
    if {"distance_closed", "distance_pairwise"} <= results.keys():
        summary["distance_ratio"] = (
            results["distance_pairwise"]["total_s"] / results["distance_closed"]["total_s"]
        )
    if {"term_ours", "term_pairwise"} <= results.keys():
        ours, pair = results["term_ours"], results["term_pairwise"]
        summary["term_loss_ratio"] = pair["loss_s"] / ours["loss_s"]
        summary["term_bank_ratio"] = pair["bank_s"] / ours["bank_s"]
        summary["term_ratio"] = pair["total_s"] / ours["total_s"]
    if {"term_ours", "term_other_form"} <= results.keys():
        summary["other_form_ratio"] = (
            results["term_other_form"]["total_s"] / results["term_ours"]["total_s"]
        )
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"contrastive term, {summary['preset']} sizes, {summary['device']}, "
        + ("" if summary["device"].startswith("cuda") else f"{summary['threads']} threads, ")
        + "median seconds"
    )
    for column in ("variant", "pixels", "loss fwd+bwd", "bank update", "total", "peak MiB", "loss"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in summary["variants"].values():
        table.add_row(
            row["variant"],
            "+".join(f"{p // 1000}k" if p >= 10_000 else str(p) for p in row["pixels"]),
            f"{row['loss_s']:.3f}",
            f"{row['bank_s']:.3f}" if "bank_s" in row else "-",
            f"{row['total_s']:.3f}",
            f"{row['peak_mib']:.0f}",
            f"{row['loss_value']:.6f}",
        )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    before, after = summary["load_average"]
    console.print(f"host load average (1 min) before / after: {before:.1f} / {after:.1f}")
    for key, label in (
        ("distance_ratio", "distance part: pairwise / closed form"),
        ("term_loss_ratio", "whole term, loss fwd+bwd: pairwise / ours"),
        ("term_bank_ratio", "bank update: pairwise / ours"),
        ("term_ratio", "whole term + bank update: pairwise / ours"),
        ("other_form_ratio", "whole term + bank update: selectors in the other form / ours"),
    ):
        if key in summary:
            console.print(f"{label}: [bold]{summary[key]:.1f}x[/bold]")


if __name__ == "__main__":  # one variant, in the subprocess that _in_subprocess starts
    print(json.dumps(run_variant(**json.loads(sys.argv[1]))))
