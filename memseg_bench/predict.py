"""Segment images with an exported model: onnxruntime, numpy and Pillow only (no torch).

For every image: `<stem>_mask.png` (palette PNG, pixel value = class id) and `<stem>_overlay.jpg`
(the image blended 50% with the coloured mask, JPEG quality 90), next to the input unless an
output folder is given.
Images are read as displayed (EXIF orientation applied). One longer than `max_side` pixels is
downscaled for the model and its mask upscaled (nearest) to the image size, which bounds memory.
A file that is not a readable image is skipped with one line; the run then ends with an error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_SIDE = 2048  # longest side the model sees; a 2048x1365 input is ~0.5 GB for a ResNet-50
OVERLAY_ROWS = 256  # rows blended at a time: temporaries stay small on large images
INPUT_NAME = "image"  # must match memseg_bench.export (not imported: it needs torch)
OUTPUT_NAME = "logits"
REQUIRED_METADATA = ("class_names", "palette", "num_classes")


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders contribute their png/jpg/jpeg/bmp files, sorted by name."""
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise UserError(f"input not found: {path}")
    return images


def parallel_runs(providers: list[str], threads: int) -> tuple[int, int]:
    """(onnxruntime threads per image, images run at once) for a folder. On the CPU whole images
    in parallel beat one image on every core: 2 cores, 240x180 CamVid frames, the embedded
    student: 128 vs 90 images/s (fp32), 278 vs 219 (int8). `threads` 0: one per image, as many
    images as cores; N: N threads per image. A GPU runs one image (or batch) at a time."""
    from memseg_bench.runtime import CUDA, machine_threads

    if threads < 0:
        raise UserError(f"--threads must be 0 (one per image) or more, got {threads}")
    if CUDA in providers:
        return threads, 1
    per_image = threads or 1
    return per_image, max(1, machine_threads() // per_image)


def open_session(model: str, provider: str = "auto", threads: int = 0):
    """An onnxruntime session on our exported model, with its metadata checked."""
    from memseg_bench.runtime import CUDA, Tuning, create_session, providers_for

    providers = providers_for(provider)
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    # The decode and write threads need the cores between the model's operators.
    session = create_session(path, providers, Tuning(threads=threads, spinning=False))
    if provider == "cuda" and session.get_providers()[0] != CUDA:
        raise UserError(f"--provider cuda: onnxruntime could not use CUDA for model {path}")
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    metadata = session.get_modelmeta().custom_metadata_map
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs or missing:
        raise UserError(
            f"model {path} is not a memseg_bench export (expected input '{INPUT_NAME}', output "
            f"'{OUTPUT_NAME}' and metadata {list(REQUIRED_METADATA)})"
        )
    return session, _read_metadata(metadata, path)


def open_parallel_session(model: str, provider: str = "auto", threads: int = 0):
    """(session, info, runs): a session with parallel_runs' threads per image, and how many
    images to run on it at once."""
    from memseg_bench.runtime import providers_for

    per_image, runs = parallel_runs(providers_for(provider), threads)
    return (*open_session(model, provider, per_image), runs)


def _read_metadata(metadata: dict, path: Path) -> dict:
    try:
        info = {
            "class_names": json.loads(metadata["class_names"]),
            "palette": json.loads(metadata["palette"]),
            "num_classes": int(metadata["num_classes"]),
        }
    except (ValueError, TypeError):
        raise UserError(f"model {path} has unreadable memseg_bench metadata") from None
    if not 1 <= info["num_classes"] <= 256:  # masks are 8-bit palette PNGs
        raise UserError(f"model {path} has {info['num_classes']} classes: masks support 1..256")
    palette = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(info["palette"], dtype=np.int64).reshape(-1, 3)[:256]
    palette[: len(colours)] = np.clip(colours, 0, 255)
    info["colours"] = palette
    return info


def model_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) the model sees: the image's, or scaled so the longer side is max_side."""
    longest = max(height, width)
    if not max_side or longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The image blended 50% with the mask's colours: round((image + colour) / 2), halves to even
    as numpy rounds, in uint16 integers (a third of the float32 blend's time)."""
    blended = np.empty_like(image)
    for start in range(0, image.shape[0], OVERLAY_ROWS):
        rows = slice(start, start + OVERLAY_ROWS)
        total = np.add(image[rows], np.take(colours, mask[rows], axis=0), dtype=np.uint16)
        half = total >> 1
        half += total & half & 1  # an odd total is a .5: up to the even neighbour when half is odd
        blended[rows] = half
    return blended


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"output folder {folder} is not writable: {reason}") from None


def predict(
    inputs: list[str],
    model: str,
    output_dir: str | None = None,
    provider: str = "auto",
    max_side: int = MAX_SIDE,
    batch: int = 1,
    threads: int = 0,
    with_overlay: bool = True,
) -> list[dict]:
    """Segment every input image; returns one dict per segmented image (paths, sizes, latency),
    in input order.

    Images are decoded and their masks written on worker threads while the model runs; up to
    `batch` images of one size go through the model together. Unreadable images are skipped,
    each with one line on stderr; a UserError after the others names them."""
    from rich.console import Console

    from memseg_bench.predict_pipeline import run_pipeline

    if max_side < 0:
        raise UserError(f"--max-side must be 0 (no limit) or positive, got {max_side}")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(highlight=False, soft_wrap=True, stderr=True)
    images = collect_images(inputs)
    if output_dir is not None:
        _check_writable(Path(output_dir))
    session, info, runs = open_parallel_session(model, provider, threads)
    console.print(
        f"model {model}: provider {session.get_providers()[0]}, "
        f"{runs} image{'s' if runs > 1 else ''} at a time"
    )

    def folder_for(path: Path) -> Path:
        return Path(output_dir) if output_dir is not None else path.parent

    run = run_pipeline(
        session,
        info,
        images,
        folder_for,
        max_side,
        batch,
        on_result=lambda result: console.print(summary_line(result), markup=False),
        on_skip=lambda error: errors.print(f"skipped: {error}", markup=False),
        with_overlay=with_overlay,
        runs=runs,
    )
    if run.results:
        console.print(
            f"{len(run.results)} images in {run.wall_s:.2f} s: "
            f"{len(run.results) / run.wall_s:.1f} images/s "
            f"(the model alone: {runs * len(run.results) / run.session_s:.1f} images/s)"
        )
    if run.skipped:
        names = ", ".join(str(p) for p in run.skipped[:5]) + (
            " ..." if len(run.skipped) > 5 else ""
        )
        raise UserError(
            f"{len(run.skipped)} of {len(images)} inputs are not readable images: {names}"
        )
    return run.results


def summary_line(result: dict) -> str:
    width, height = result["width"], result["height"]
    line = f"{result['input']}: {width}x{height} -> {result['mask']} ({result['latency_ms']:.1f} ms"
    if result["batch"] > 1:
        line += f" for a batch of {result['batch']}"
    if (result["model_width"], result["model_height"]) != (width, height):
        line += f", segmented at {result['model_width']}x{result['model_height']}"
    return line + ")"
