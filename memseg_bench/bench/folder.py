"""Two measurements behind the inference README: `memseg predict`'s throughput on a folder against
the bare session on the same decoded images, and what each ONNX Runtime session option costs."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

CPU_PROVIDERS = ["CPUExecutionProvider"]
# Rounds of (bare session, predict, predict --no-overlay, one image at a time), each pass over the
# whole folder; the rates are the medians over rounds, so that machine load that drifts during the
# run (file-system latency here varied 10x between minutes) weighs on all of them alike.
ROUNDS = 3


def bench_folder(model: Path, folder: Path, threads: int, rounds: int = ROUNDS) -> dict:
    """Images/s of predict's pipeline (decode, model, write) on every image of `folder`; of its
    session alone on the same images already decoded, as many at a time as predict runs; and of
    one image at a time on `threads` threads (predict's way before it ran images in parallel).
    Beside each rate, the process's CPU time and context switches per image: predict's minus the
    bare session's CPU is what decoding, argmax and writing cost the cores."""
    from concurrent.futures import ThreadPoolExecutor
    from statistics import median

    import numpy as np

    from memseg_bench.fileio import read_image
    from memseg_bench.predict import (
        MAX_SIDE,
        collect_images,
        open_parallel_session,
        open_session,
    )
    from memseg_bench.predict_pipeline import run_pipeline

    images = collect_images([str(folder)])
    decoded = [read_image(path, orient=True).transpose(2, 0, 1)[None] for path in images]
    feeds = [{"image": np.ascontiguousarray(image, dtype=np.float32)} for image in decoded]

    def timed(work) -> tuple[float, float, int]:
        """(wall s, process CPU s, context switches) of work()"""
        before, wall, cpu = switches(), time.perf_counter(), time.process_time()
        work()
        return time.perf_counter() - wall, time.process_time() - cpu, switches() - before

    def bare(session, runs: int) -> tuple[float, float, int]:
        session.run(["logits"], feeds[0])  # warm-up, outside the timing
        with ThreadPoolExecutor(runs) as pool:
            return timed(lambda: list(pool.map(lambda f: session.run(["logits"], f), feeds)))

    stage_cpu: list[dict[str, float]] = []  # predict's, per round

    def pipeline(session, info, runs: int, with_overlay: bool) -> tuple[float, float, int]:
        with tempfile.TemporaryDirectory(prefix="memseg-bench-out-") as out:

            def work() -> None:
                run = run_pipeline(session, info, images, lambda _: Path(out), MAX_SIDE, 1,
                                   lambda _: None, print, with_overlay, runs)  # fmt: skip
                if with_overlay:
                    stage_cpu.append(run.stage_cpu_s)

            return timed(work)

    one_image, _ = open_session(str(model), "cpu", threads)
    session, info, runs = open_parallel_session(str(model), "cpu")
    measured: dict[str, list[tuple[float, float, int]]] = {
        "session": [], "predict": [], "masks_only": [], "one_image": []
    }  # fmt: skip
    for _ in range(rounds):
        measured["session"].append(bare(session, runs))
        measured["predict"].append(pipeline(session, info, runs, True))
        measured["masks_only"].append(pipeline(session, info, runs, False))
        measured["one_image"].append(bare(one_image, 1))
    count = len(images)

    def medians(of) -> dict[str, float]:
        """Per measurement, the median over rounds of of(wall s, CPU s, context switches)."""
        return {name: median(of(*row) for row in rows) for name, rows in measured.items()}

    rate = medians(lambda wall, cpu, changes: count / wall)
    cpu_ms = medians(lambda wall, cpu, changes: 1000 * cpu / count)
    switched = medians(lambda wall, cpu, changes: changes / count)
    return {
        "folder": str(folder),
        "images": len(images),
        "runs": runs,
        "rounds": rounds,
        "predict_images_per_s": rate["predict"],
        "session_images_per_s": rate["session"],
        "ratio": rate["predict"] / rate["session"],
        "masks_only_images_per_s": rate["masks_only"],
        "masks_only_ratio": rate["masks_only"] / rate["session"],
        "one_image_images_per_s": rate["one_image"],
        "ratio_to_one_image": rate["predict"] / rate["one_image"],
        "session_cpu_ms_per_image": cpu_ms["session"],
        "predict_cpu_ms_per_image": cpu_ms["predict"],
        "masks_only_cpu_ms_per_image": cpu_ms["masks_only"],
        # predict's CPU per image by stage; with one onnxruntime thread per image the session's
        # is all of it, and its excess over the bare session's is what sharing the cores costs
        "predict_stage_cpu_ms_per_image": {
            stage: median(1000 * round_[stage] / count for round_ in stage_cpu)
            for stage in stage_cpu[0]
        },
        "session_switches_per_image": switched["session"],
        "predict_switches_per_image": switched["predict"],
    }


def switches() -> int:
    """Context switches of this process so far, voluntary and involuntary: each costs the thread
    that resumes its caches."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def bench_tuning(model: Path, sizes: Sequence[tuple[int, int]], repeats: int, threads: int):
    """Median latency of onnxruntime's default session and of the tuned one with one option
    changed at a time, interleaved, at each size."""
    import numpy as np
    import onnxruntime as ort

    from memseg_bench.bench.infer import _median_ms
    from memseg_bench.runtime import Tuning, create_session

    tuned = Tuning(threads=threads)
    variants = {
        "onnxruntime defaults": None,
        "tuned": tuned,
        "optimization basic": dataclasses.replace(tuned, optimization="basic"),
        "optimization extended": dataclasses.replace(tuned, optimization="extended"),
        "no spinning": dataclasses.replace(tuned, spinning=False),
        "no memory arena": dataclasses.replace(tuned, memory_arena=False),
        "no memory pattern": dataclasses.replace(tuned, memory_pattern=False),
        "parallel execution": dataclasses.replace(tuned, parallel=True),
        "1 thread": dataclasses.replace(tuned, threads=1),
    }
    sessions = []
    for tuning in variants.values():
        if tuning is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sessions.append(ort.InferenceSession(str(model), options, providers=CPU_PROVIDERS))
        else:
            sessions.append(create_session(model, CPU_PROVIDERS, tuning))
    by_variant = {name: [] for name in variants}
    for size in sizes:
        image = np.random.default_rng(0).uniform(0, 255, (1, 3, *size)).astype(np.float32)
        feed = {"image": image}
        runs = [lambda s=s, f=feed: s.run(["logits"], f) for s in sessions]
        for name, ms in zip(variants, _median_ms(runs, repeats), strict=True):
            by_variant[name].append({"size": f"{size[0]}x{size[1]}", "ms": ms})
    return [{"variant": name, "by_size": rows} for name, rows in by_variant.items()]
