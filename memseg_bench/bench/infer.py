"""Inference latency: PyTorch eager vs onnxruntime (CPU) on the same weights, same process."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from memseg_bench.errors import UserError

WARMUP = 2
RANDOM_INIT_CLASSES = 21


def _median_ms(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each callable; the callables alternate so that drifting machine load
    affects them alike."""
    for run in runs:
        for _ in range(WARMUP):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1000)
    return [statistics.median(samples) for samples in times]


def bench_infer(
    model_file: str | None,
    backbone: str = "resnet50",
    size: int = 512,
    repeats: int = 10,
    threads: int = 2,
) -> dict:
    """Median latency (ms) of eager PyTorch and onnxruntime CPU at size x size, batch 1.

    Without a model file a random-init DeepLabv3+ with `backbone` and 21 classes is used."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from rich.console import Console

    from memseg_bench.config import DataConfig, ModelConfig
    from memseg_bench.export import FullResolution, export_model, ort_session
    from memseg_bench.models import BACKBONES, build_segmenter, load_segmenter

    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if size < 32:
        raise UserError(f"--size must be at least 32, got {size}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if model_file is None:
        if backbone not in BACKBONES:
            raise UserError(f"--backbone must be one of {list(BACKBONES)}, got {backbone!r}")
        data = DataConfig()
        torch.manual_seed(0)
        segmenter = build_segmenter(
            ModelConfig(backbone=backbone), RANDOM_INIT_CLASSES, data.mean, data.std
        ).eval()
        description = f"random-init deeplabv3plus {backbone}"
    else:
        segmenter, info = load_segmenter(model_file)
        config = info["config"]
        description = f"{model_file} ({config.model.arch} {config.model.backbone})"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wrapper = FullResolution(segmenter).eval()
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
        with tempfile.TemporaryDirectory(prefix="memseg-bench-") as folder:
            path = Path(folder) / "model.onnx"
            export_model(wrapper, path, opset=18, metadata={"producer": "memseg_bench"})
            session = ort_session(path, ["CPUExecutionProvider"], threads=threads)
            feed = {"image": image.numpy()}

            def eager() -> object:
                with torch.inference_mode():
                    return wrapper(image)

            def onnx() -> object:
                return session.run(["logits"], feed)

            eager_ms, ort_ms = _median_ms([eager, onnx], repeats)
            max_diff = float(np.abs(eager().numpy() - onnx()[0]).max())
            provider = session.get_providers()[0]
    finally:
        torch.set_num_threads(previous_threads)
    result = {
        "model": description,
        "size": size,
        "batch": 1,
        "threads": threads,
        "repeats": repeats,
        "eager_ms": round(eager_ms, 2),
        "ort_ms": round(ort_ms, 2),
        "ratio_eager_over_ort": round(eager_ms / ort_ms, 3),
        "provider": provider,
        "max_abs_diff": max_diff,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    Console(highlight=False).print(result)
    return result
