"""Inference latency: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 on the same weights,
in one process, at several sizes; the int8 model's mIoU cost; and `memseg predict`'s folder
throughput against the bare session (memseg_bench/bench/folder.py)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from memseg_bench.errors import UserError

WARMUP = 2
RANDOM_INIT_CLASSES = 21
CPU_PROVIDERS = ["CPUExecutionProvider"]
# After a run, an onnxruntime session's pool threads spin for about 50 ms (measured: 50-60 ms of
# CPU time while the caller slept 100-500 ms), and torch's OpenMP threads briefly too. Timed back
# to back, the next callable shares the cores with them: fp32 at 512x512 took 92 ms interleaved
# with the int8 session against 53 ms alone, and the shorter int8 run lost the most. Each timed
# run starts after this pause instead, with every other thread pool parked.
SETTLE_S = 0.1
CPU_COLUMNS = (
    "session_cpu_ms_per_image",
    "predict_cpu_ms_per_image",
    "masks_only_cpu_ms_per_image",
)


def _median_ms(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each callable; the callables alternate so that drifting machine load
    affects them alike, each timed after the others' threads have settled (SETTLE_S)."""
    for run in runs:
        for _ in range(WARMUP):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times, strict=True):
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1000)
    return [statistics.median(samples) for samples in times]


def protocol_size(config) -> tuple[int, int]:
    """(height, width) of the first image of the protocol's evaluation split."""
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.fileio import read_image

    index = open_dataset(config.data)
    split = config.evaluate.split
    ids = index.ids(split)
    if not ids:
        raise UserError(f"data.root {index.root}: the evaluation split {split!r} is empty")
    return read_image(index.paths(split, ids[0])[0]).shape[:2]


def _segmenter(model_file: str | None, backbone: str, config):
    """(segmenter, description, config it belongs to, ONNX metadata): a trained model file, or a
    random init."""
    import torch

    from memseg_bench.config import ModelConfig
    from memseg_bench.export import metadata_for
    from memseg_bench.models import BACKBONES, build_segmenter, load_segmenter

    if model_file is not None:
        segmenter, info = load_segmenter(model_file)
        stored = info["config"]
        described = f"{model_file} ({stored.model.arch} {stored.model.backbone})"
        return segmenter, described, stored, metadata_for(info, segmenter.num_classes)
    if backbone not in BACKBONES:
        raise UserError(f"--backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    torch.manual_seed(0)
    segmenter = build_segmenter(
        ModelConfig(backbone=backbone), RANDOM_INIT_CLASSES, config.data.mean, config.data.std
    )
    metadata = {"producer": "memseg_bench"}
    return segmenter.eval(), f"random-init deeplabv3plus {backbone}", config, metadata


def _latencies(wrapper, sessions: dict, size: tuple[int, int], repeats: int) -> dict:
    import numpy as np
    import torch

    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) * 255
    feed = {"image": image.numpy()}

    def eager() -> object:
        with torch.inference_mode():
            return wrapper(image)

    def onnx(session) -> Callable[[], object]:
        return lambda: session.run(["logits"], feed)

    eager_ms, fp32_ms, int8_ms = _median_ms(
        [eager, onnx(sessions["fp32"]), onnx(sessions["int8"])], repeats
    )
    expected = eager().numpy()
    (fp32,) = sessions["fp32"].run(["logits"], feed)
    (int8,) = sessions["int8"].run(["logits"], feed)
    return {
        "size": f"{size[0]}x{size[1]}",
        "eager_ms": round(eager_ms, 2),
        "ort_fp32_ms": round(fp32_ms, 2),
        "ort_int8_ms": round(int8_ms, 2),
        "fp32_speedup_over_eager": round(eager_ms / fp32_ms, 3),
        "int8_speedup_over_fp32": round(fp32_ms / int8_ms, 3),
        "int8_speedup_over_eager": round(eager_ms / int8_ms, 3),
        "fp32_max_abs_diff": float(np.abs(expected - fp32).max()),
        # Agreement on this random input only; the evaluation split's is in int8_cost.
        "int8_argmax_agreement": float((fp32.argmax(1) == int8.argmax(1)).mean()),
    }


def bench_model(
    model_file: str | None,
    backbone: str,
    config,
    sizes: Sequence[tuple[int, int] | None],
    repeats: int,
    threads: int,
    folder: Path | None = None,
    tuning: bool = False,
    profile: bool = False,
) -> dict:
    """Latencies at each size (None: the protocol's); for a trained model the int8 mIoU cost, and
    with `folder` predict's throughput on it; with `profile` where the fp32 session's time goes."""
    import torch

    from memseg_bench.bench.folder import bench_folder, bench_tuning
    from memseg_bench.bench.profile import gemm_gflops, profile_model
    from memseg_bench.export import FullResolution, Int8Export, export_model, int8_check
    from memseg_bench.quantize import Int8Method, calibration_ids, calibration_images, quantize_int8
    from memseg_bench.runtime import Tuning, create_session

    segmenter, description, model_config, metadata = _segmenter(model_file, backbone, config)
    wrapper = FullResolution(segmenter).eval()
    sizes = [size or protocol_size(model_config) for size in sizes]
    result: dict = {"model": description, "latency": [], "int8_cost": None, "folder": None}
    with tempfile.TemporaryDirectory(prefix="memseg-bench-") as work:
        paths = {"fp32": Path(work) / "fp32.onnx", "int8": Path(work) / "int8.onnx"}
        export_model(wrapper, paths["fp32"], opset=18, metadata=metadata)
        settings = config.export  # the params' int8 method, not the one stored at training
        if model_file is not None:
            int8 = Int8Export(
                paths["int8"],
                settings.int8_calibration_images,
                settings.int8_calibration_seed,
                settings.int8_max_miou_drop,
                Int8Method(settings.int8_per_channel, settings.int8_calibrate_method),
            )
            cost = int8_check(paths["fp32"], paths["int8"], int8, model_config)
            result["int8_cost"] = {
                k: cost[k]
                for k in ("eval_split", "fp32_miou", "int8_miou", "miou_drop", "pixel_agreement")
            }
        else:  # nothing to score an untrained model on: calibrate on the protocol's images
            from memseg_bench.data.datasets import open_dataset

            index = open_dataset(config.data)
            ids = calibration_ids(index.ids("train"), settings.int8_calibration_images, 0)
            images = calibration_images(index, ids, config.data.input_scale)
            quantize_int8(paths["fp32"], paths["int8"], images, Int8Method())
        sessions = {
            name: create_session(path, CPU_PROVIDERS, Tuning(threads=threads))
            for name, path in paths.items()
        }
        result["provider"] = sessions["fp32"].get_providers()[0]
        with torch.inference_mode():
            for size in sizes:
                result["latency"].append(_latencies(wrapper, sessions, size, repeats))
        if profile:
            gemm = gemm_gflops(threads, repeats)
            result["profile"] = [
                profile_model(paths["fp32"], size, threads, repeats, row["eager_ms"], gemm)
                for size, row in zip(sizes, result["latency"], strict=True)
            ]
        if tuning:
            result["tuning"] = {
                name: bench_tuning(path, sizes, repeats, threads) for name, path in paths.items()
            }
        if folder is not None and model_file is not None:
            result["folder"] = [
                {"model": name, **bench_folder(path, folder, threads)}
                for name, path in paths.items()
            ]
    return result


def bench_infer(
    model_files: Sequence[str | None],
    config,
    backbone: str = "resnet50",
    sizes: Sequence[tuple[int, int] | None] = ((512, 512), None),
    repeats: int = 10,
    threads: int = 2,
    folder: str | None = None,
    tuning: bool = False,
    profile: bool = False,
) -> list[dict]:
    """bench_model for each model file (None: a random-init DeepLabv3+ with `backbone` and 21
    classes), torch and onnxruntime both on `threads` threads; prints the tables."""
    import torch

    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    for size in sizes:
        if size is not None and min(size) < 32:
            raise UserError(f"--size must be at least 32, got {size[0]}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    folder_path = None if folder is None else Path(folder)
    if folder_path is not None and not folder_path.is_dir():
        raise UserError(f"--folder {folder}: not a folder")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = [
            bench_model(
                model, backbone, config, sizes, repeats, threads, folder_path, tuning, profile
            )
            for model in model_files
        ]
    finally:
        torch.set_num_threads(previous_threads)
    print_results(results, threads)
    return results


def print_results(results: list[dict], threads: int) -> None:
    import onnxruntime as ort
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=200)
    console.print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads, batch 1, "
        f"provider {results[0]['provider']}"
    )
    latency = Table("model", "size", "eager ms", "ORT fp32 ms", "ORT int8 ms", "fp32/eager",
                    "int8/fp32", "int8/eager")  # fmt: skip
    for result in results:
        for row in result["latency"]:
            latency.add_row(
                result["model"], row["size"], f"{row['eager_ms']:.1f}", f"{row['ort_fp32_ms']:.1f}",
                f"{row['ort_int8_ms']:.1f}", f"{row['fp32_speedup_over_eager']:.2f}x",
                f"{row['int8_speedup_over_fp32']:.2f}x", f"{row['int8_speedup_over_eager']:.2f}x",
            )  # fmt: skip
    console.print(latency)
    for result in results:
        cost = result["int8_cost"]
        if cost is not None:
            console.print(
                f"{result['model']}: mIoU on {cost['eval_split']} {100 * cost['fp32_miou']:.2f} "
                f"(fp32) -> {100 * cost['int8_miou']:.2f} (int8), cost {cost['miou_drop']:+.2f} "
                f"points, pixel agreement {cost['pixel_agreement']:.4f}"
            )
        for row in result.get("profile", []):
            print_profile(console, result["model"], row)
        for name, rows in result.get("tuning", {}).items():
            table = Table("session option", *[row["size"] for row in rows[0]["by_size"]])
            for variant in rows:
                table.add_row(
                    variant["variant"], *[f"{r['ms']:.2f} ms" for r in variant["by_size"]]
                )
            console.print(f"{result['model']} ORT {name}: session options")
            console.print(table)
        if result["folder"]:
            table = Table("model", "images", "images at once", "session images/s",
                          "predict images/s", "ratio", "--no-overlay images/s", "ratio",
                          "one image on all cores, images/s", "predict / that",
                          "CPU ms/image: session, predict, --no-overlay",
                          "switches/image: session, predict")  # fmt: skip
            for row in result["folder"]:
                table.add_row(
                    row["model"], str(row["images"]), str(row["runs"]),
                    f"{row['session_images_per_s']:.1f}",
                    f"{row['predict_images_per_s']:.1f}", f"{row['ratio']:.3f}",
                    f"{row['masks_only_images_per_s']:.1f}", f"{row['masks_only_ratio']:.3f}",
                    f"{row['one_image_images_per_s']:.1f}", f"{row['ratio_to_one_image']:.3f}",
                    ", ".join(f"{row[key]:.1f}" for key in CPU_COLUMNS),
                    f"{row['session_switches_per_image']:.1f}, "
                    f"{row['predict_switches_per_image']:.1f}",
                )  # fmt: skip
            console.print(
                f"{result['model']}: folder {result['folder'][0]['folder']} "
                f"(medians of {result['folder'][0]['rounds']} rounds)"
            )
            console.print(table)
            for row in result["folder"]:
                stages = row["predict_stage_cpu_ms_per_image"]
                console.print(
                    f"{row['model']}: predict's CPU ms per image by stage: "
                    + ", ".join(f"{stage} {ms:.2f}" for stage, ms in stages.items())
                    + f" (the bare session: {row['session_cpu_ms_per_image']:.2f})"
                )


PROFILE_MIN_SHARE = 0.01  # operator types below this share of the run are summed as "other"


def print_profile(console, model: str, row: dict) -> None:
    from rich.table import Table

    from memseg_bench.bench.profile import GEMM_SIZE

    table = Table("operator", "nodes", "ms per run", "share")
    shown = [op for op in row["by_op"] if op["share"] >= PROFILE_MIN_SHARE]
    rest = [op for op in row["by_op"] if op["share"] < PROFILE_MIN_SHARE]
    for op in shown:
        table.add_row(op["op"], str(int(op["nodes"])), f"{op['ms']:.1f}", f"{op['share']:.1%}")
    if rest:
        table.add_row("other", str(int(sum(op["nodes"] for op in rest))),
                      f"{sum(op['ms'] for op in rest):.1f}",
                      f"{sum(op['share'] for op in rest):.1%}")  # fmt: skip
    console.print(f"{model} ORT fp32 at {row['size']}: profiled, {row['run_ms']:.1f} ms per run")
    console.print(table)
    console.print(
        f"convolutions: {row['conv_gflop']:.1f} GFLOP per image; ORT runs them at "
        f"{row['conv_gflops_per_s']:.0f} GFLOP/s, eager the whole model at "
        f"{row['eager_gflops_per_s']:.0f} GFLOP/s; onnxruntime's {GEMM_SIZE}x{GEMM_SIZE} "
        f"MatMul on these threads: {row['gemm_gflops_per_s']:.0f} GFLOP/s"
    )
