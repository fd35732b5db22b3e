"""Training-step benchmarks on random batches of the configured size, on whatever device is present.

The memory bank path is forced to run from the first step (memory and contrastive start at step 0,
no quality filter) so that its cost is always measured; with a random-init teacher few pixels would
otherwise pass the filter."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from memseg_bench.config import Config
from memseg_bench.data.random_batches import RandomBatches
from memseg_bench.runs import make_spec
from memseg_bench.timing import labeled_images_per_s

CLASS_COUNTS = {"voc": 21, "cityscapes": 19, "camvid": 11, "synthetic": 6, "folder": 11}
PHASES = (
    "data",
    "teacher_forward",
    "augment",
    "student_forward",
    "contrastive",
    "backward",
    "optimizer_ema",
    "memory_update",
)


def bench_config(config: Config, amp: str | None = None) -> Config:
    memseg = dataclasses.replace(
        config.methods.memseg, memory_start=0, contrastive_start=0, quality_filter=False
    )
    selftrain = dataclasses.replace(config.methods.selftrain, class_weights_start=0)
    train = dataclasses.replace(
        config.train,
        val_every=0,
        log_every=10**9,
        checkpoint_every=10**9,
        amp=amp or config.train.amp,
        iterations=10**6,
    )
    # Timing does not depend on the weights: random init needs no local weight file.
    model = dataclasses.replace(config.model, weights=None)
    return dataclasses.replace(
        config,
        methods=dataclasses.replace(
            config.methods, phase_start="at", memseg=memseg, selftrain=selftrain
        ),
        train=train,
        model=model,
    )


def time_method(config: Config, method: str, steps: int, warmup: int) -> dict:
    from memseg_bench.engine import TrainData, Trainer
    from memseg_bench.timing import PhaseTimer

    num_classes = CLASS_COUNTS.get(config.data.name, 19)
    train = config.train
    data = TrainData(
        class_names=[f"class{i}" for i in range(num_classes)],
        palette=[[i, i, i] for i in range(num_classes)],
        n_labeled=max(config.sweep.n_labeled),
        split_hash=None,
        labeled=RandomBatches(train.batch_labeled, train.crop, num_classes, 0, pool=4),
        unlabeled=RandomBatches(train.batch_unlabeled, train.crop, num_classes, 1, pool=4),
    )
    spec = make_spec(method, "bench", data.n_labeled, 0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, spec, Path(tmp), Path(tmp), data=data)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        timer = PhaseTimer(trainer.device, enabled=True)
        trainer.ctx.timer = timer
        durations = []
        for index in range(warmup + steps):
            if index == warmup:
                timer.reset()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            start = time.perf_counter()
            trainer.train_step()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            if index >= warmup:
                durations.append(time.perf_counter() - start)
        from memseg_bench.runs import peak_memory

        memory = peak_memory(trainer.device)
        device = trainer.device
    step_s = statistics.median(durations)
    total = sum(durations)
    phases = {name: timer.totals.get(name, 0.0) / steps for name in PHASES}
    return {
        "method": method,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "step_s": step_s,
        "images_per_s": labeled_images_per_s(1, train.batch_labeled, 1, step_s),
        "phases_s": phases,
        "phase_share": {name: value * steps / total for name, value in phases.items()},
        **memory,
    }


def _print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    Console().print(table)


# Step-time goals of the positive controls, as a multiple of a supervised step.
CONTROL_GOALS = {"fixmatch": 2.0, "unimatch": 3.0}


def bench_step(config: Config, steps: int = 5, threads: int = 2, warmup: int = 2) -> dict:
    torch.set_num_threads(threads)
    config = bench_config(config)
    from memseg_bench.methods import METHODS

    results = {m: time_method(config, m, steps, warmup) for m in METHODS}
    base = results["supervised"]["step_s"]
    rows = [
        {
            "method": m,
            "step_s": r["step_s"],
            "vs_supervised": r["step_s"] / base,
            "vs_selftrain": r["step_s"] / results["selftrain"]["step_s"],
            "peak_mb": r["peak_memory_mb"],
        }
        for m, r in results.items()
    ]
    train = config.train
    _print_table(
        f"step time, {config.model.arch}-{config.model.backbone}, crop {train.crop}, "
        f"{train.batch_labeled}+{train.batch_unlabeled} images, {results['memseg']['device']}",
        rows,
    )
    for method, goal in CONTROL_GOALS.items():
        ratio = results[method]["step_s"] / base
        verdict = "met" if ratio <= goal else "MISSED"
        print(f"{method} step / supervised step = {ratio:.2f} (goal <= {goal:g}: {verdict})")
    return results


def bench_train(
    config: Config,
    method: str = "memseg",
    steps: int = 5,
    warmup: int = 2,
    threads: int = 2,
    amp: str | None = None,
) -> dict:
    torch.set_num_threads(threads)
    config = bench_config(config, amp)
    result = time_method(config, method, steps, warmup)
    rows = [
        {"phase": name, "seconds": result["phases_s"][name], "share": result["phase_share"][name]}
        for name in PHASES
    ]
    train = config.train
    _print_table(
        f"{method} step breakdown, {config.model.arch}-{config.model.backbone}, crop {train.crop}, "
        f"{train.batch_labeled}+{train.batch_unlabeled} images, amp {config.train.amp}, "
        f"{result['device']}: {result['images_per_s']:.2f} labeled images/s, "
        f"peak {result['peak_memory_mb']:.0f} MB ({result['memory_kind']})",
        rows,
    )
    return result
