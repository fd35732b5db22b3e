"""The folder pipeline of `memseg predict`: decode, model, write, overlapped.

A reader thread decodes (and, past max_side, downscales) the next images while the model runs on
the current batches (`runs` at once, on threads of their own); a writer thread takes the argmax,
builds the overlay and writes both PNGs. Pillow, numpy and onnxruntime release the GIL in their
heavy loops, so all of them overlap. Images wait in small bounded queues: memory stays that of a
few images whatever the folder holds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError
from memseg_bench.fileio import read_image, save_png

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
READ_AHEAD = 2  # decoded images waiting beyond one batch
WRITES_IN_FLIGHT = 2  # batches whose masks are still being written
# PNG encoding is most of predict's work beside the model: level 1 takes about half the time of
# zlib's default 6 on 240x180 CamVid frames, for files about 1.3x larger.
PNG_LEVEL = 1


@dataclass
class Decoded:
    position: int
    path: Path
    image: np.ndarray  # as displayed, full size
    model_input: np.ndarray  # what the model sees: the image, or downscaled to max_side


@dataclass
class Unreadable:
    path: Path
    error: UserError


@dataclass
class PipelineRun:
    results: list[dict] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    wall_s: float = 0.0
    session_s: float = 0.0  # time inside session.run


def decode(position: int, path: Path, max_side: int) -> Decoded | Unreadable:
    from PIL import Image

    from memseg_bench.predict import model_size

    try:
        image = read_image(path, orient=True)
    except UserError as error:
        return Unreadable(path, error)
    height, width = image.shape[:2]
    size = model_size(height, width, max_side)
    small = image
    if size != (height, width):
        small = np.asarray(
            Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        )
    return Decoded(position, path, image, small)


def class_ids(logits: np.ndarray) -> np.ndarray:
    """argmax over classes of [C, H, W] logits as uint8, first class on ties; one pass per class
    over contiguous planes instead of numpy's strided argmax."""
    best = logits[0].copy()
    ids = np.zeros(best.shape, np.uint8)
    for c in range(1, logits.shape[0]):
        better = logits[c] > best
        ids[better] = c
        np.maximum(best, logits[c], out=best)
    return ids


def write(
    item: Decoded,
    logits: np.ndarray,
    info: dict,
    folder: Path,
    latency_ms: float,
    batch: int,
    with_overlay: bool = True,
) -> dict:
    from PIL import Image

    from memseg_bench.predict import overlay

    image = item.image
    height, width = image.shape[:2]
    mask = class_ids(logits)
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    mask_path = folder / f"{item.path.stem}_mask.png"
    overlay_path = folder / f"{item.path.stem}_overlay.png"
    save_png(mask_path, mask, palette=info["palette"], compress_level=PNG_LEVEL)
    if with_overlay:
        blended = overlay(image, mask, info["colours"])
        save_png(overlay_path, blended, compress_level=PNG_LEVEL)
    return {
        "input": str(item.path),
        "mask": str(mask_path),
        "overlay": str(overlay_path) if with_overlay else None,
        "height": int(height),
        "width": int(width),
        "model_height": int(item.model_input.shape[0]),
        "model_width": int(item.model_input.shape[1]),
        "latency_ms": latency_ms,
        "batch": batch,
    }


def batches(decoded: Iterator[Decoded], batch: int) -> Iterator[list[Decoded]]:
    """Groups of up to `batch` decoded images of one model size. Images wait per size; when more
    than 2 x batch wait, the fullest group goes, so memory stays bounded on mixed folders."""
    waiting: dict[tuple, list[Decoded]] = {}
    for item in decoded:
        group = waiting.setdefault(item.model_input.shape, [])
        group.append(item)
        if len(group) == batch:
            yield waiting.pop(item.model_input.shape)
        elif sum(len(g) for g in waiting.values()) > 2 * batch:
            yield waiting.pop(max(waiting, key=lambda shape: len(waiting[shape])))
    yield from waiting.values()


def decoded_in_order(
    images: list[Path], max_side: int, window: int, pool, run: PipelineRun, on_skip
) -> Iterator[Decoded]:
    """The decoded images in input order, up to `window` decoding ahead on `pool`; unreadable
    ones are reported to `on_skip` and recorded in `run.skipped`."""
    pending: deque[Future] = deque()
    upcoming = iter(enumerate(images))
    for position, path in upcoming:
        pending.append(pool.submit(decode, position, path, max_side))
        if len(pending) >= window:
            break
    while pending:
        outcome = pending.popleft().result()
        following = next(upcoming, None)
        if following is not None:
            pending.append(pool.submit(decode, *following, max_side))
        if isinstance(outcome, Unreadable):
            on_skip(outcome.error)
            run.skipped.append(outcome.path)
        else:
            yield outcome


def run_pipeline(
    session,
    info: dict,
    images: list[Path],
    folder_for: Callable[[Path], Path],
    max_side: int,
    batch: int,
    on_result: Callable[[dict], None],
    on_skip: Callable[[UserError], None],
    with_overlay: bool = True,
    runs: int = 1,
) -> PipelineRun:
    run = PipelineRun()
    started = time.perf_counter()
    writes: deque[list[tuple[int, Future]]] = deque()
    running: deque[tuple[list[Decoded], Future]] = deque()
    done: list[tuple[int, dict]] = []

    def infer(group: list[Decoded]) -> tuple[np.ndarray, float]:
        inputs = np.stack([item.model_input.transpose(2, 0, 1) for item in group])
        feed = {INPUT_NAME: inputs.astype(np.float32)}
        start = time.perf_counter()
        (logits,) = session.run([OUTPUT_NAME], feed)
        return logits, time.perf_counter() - start

    def hand_over(group: list[Decoded], inferred: Future) -> None:
        logits, elapsed = inferred.result()
        run.session_s += elapsed
        writes.append(
            [
                (
                    item.position,
                    writer.submit(
                        write,
                        item,
                        item_logits,
                        info,
                        folder_for(item.path),
                        elapsed * 1000,
                        len(group),
                        with_overlay,
                    ),
                )
                for item, item_logits in zip(group, logits, strict=True)
            ]
        )
        if len(writes) > WRITES_IN_FLIGHT:
            finish(writes.popleft())

    def finish(futures: list[tuple[int, Future]]) -> None:
        for position, future in futures:
            result = future.result()
            on_result(result)
            done.append((position, result))

    with (
        ThreadPoolExecutor(1, thread_name_prefix="memseg-read") as reader,
        ThreadPoolExecutor(runs, thread_name_prefix="memseg-model") as model,
        ThreadPoolExecutor(runs, thread_name_prefix="memseg-write") as writer,
    ):
        window = runs * batch + READ_AHEAD
        decoded = decoded_in_order(images, max_side, window, reader, run, on_skip)
        for group in batches(decoded, batch):
            running.append((group, model.submit(infer, group)))
            if len(running) >= runs:
                hand_over(*running.popleft())
        while running:
            hand_over(*running.popleft())
        while writes:
            finish(writes.popleft())
    run.results = [result for _, result in sorted(done, key=lambda pair: pair[0])]
    run.wall_s = time.perf_counter() - started
    return run
