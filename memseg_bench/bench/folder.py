"""Two measurements behind the inference README: `memseg predict`'s throughput on a folder against
the bare session on the same decoded images, and what each ONNX Runtime session option costs."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

CPU_PROVIDERS = ["CPUExecutionProvider"]


def bench_folder(model: Path, folder: Path, threads: int) -> dict:
    """Images/s of predict's pipeline (decode, model, write) on every image of `folder`; of its
    session alone on the same images already decoded, as many at a time as predict runs; and of
    one image at a time on `threads` threads (predict's way before it ran images in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

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

    def bare_rate(session, runs: int) -> float:
        session.run(["logits"], feeds[0])  # warm-up, outside the timing
        start = time.perf_counter()
        with ThreadPoolExecutor(runs) as pool:
            list(pool.map(lambda feed: session.run(["logits"], feed), feeds))
        return len(feeds) / (time.perf_counter() - start)

    one_image, _ = open_session(str(model), "cpu", threads)
    one_image_rate = bare_rate(one_image, 1)
    session, info, runs = open_parallel_session(str(model), "cpu")
    session_rate = bare_rate(session, runs)
    rates = {}
    for with_overlay in (True, False):
        with tempfile.TemporaryDirectory(prefix="memseg-bench-out-") as out:
            run = run_pipeline(
                session, info, images, lambda _: Path(out), MAX_SIDE, 1, lambda _: None, print,
                with_overlay=with_overlay, runs=runs,
            )  # fmt: skip
        rates[with_overlay] = len(run.results) / run.wall_s
    return {
        "folder": str(folder),
        "images": len(run.results),
        "runs": runs,
        "predict_images_per_s": rates[True],
        "session_images_per_s": session_rate,
        "ratio": rates[True] / session_rate,
        "masks_only_images_per_s": rates[False],
        "masks_only_ratio": rates[False] / session_rate,
        "one_image_images_per_s": one_image_rate,
        "ratio_to_one_image": rates[True] / one_image_rate,
    }


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
