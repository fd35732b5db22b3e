"""The folder pipeline of `memseg predict`: decode, model, write, overlapped.

A reader thread decodes (and, past max_side, downscales) the next images in input order; the main
thread groups them into batches and hands each to a model thread (`runs` of them, each running its
own batches); a model thread hands its masks to the writer threads (half as many: argmax, overlay,
both PNGs) and takes the next batch at once. Nothing waits on anything but its own input: the
main thread only reports finished images, in order, as they come. Pillow, numpy and onnxruntime
release the GIL in their heavy loops, so all of them overlap. Batches and writes wait in bounded
numbers, so memory stays that of a few images whatever the folder holds.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError
from memseg_bench.fileio import read_image, save_jpeg, save_png

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
READ_AHEAD = 2  # decoded images waiting beyond one batch
BATCHES_QUEUED = 1  # batches (per model thread) waiting for a model thread beyond those running
WRITES_IN_FLIGHT = 2  # batches (per model thread) whose masks are still being written
# Writer threads per model thread. Writing takes a fraction of the model's time per image, and
# every extra busy thread makes the cores switch more: on 2 cores, one writer beside the two model
# threads gave 0.70 of the bare session's images/s with overlays against 0.66 with two writers
# (fp32), and 0.70 against 0.64 with --no-overlay (int8), in one run.
WRITERS_PER_RUN = 0.5
# Encoding is most of predict's work beside the model. The mask PNG (palette, exact class ids)
# is deflated at level 1: about half the time of zlib's default 6 on 240x180 CamVid frames, for
# files about 1.3x larger. The overlay is for viewing and is a JPEG (4:4:4): 0.18 ms and 11 KB
# per CamVid frame against 2.4 ms and 57 KB for the fastest RGB PNG Pillow writes.
PNG_LEVEL = 1
OVERLAY_JPEG_QUALITY = 90


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
    # CPU seconds per stage (decode, session, write), summed over the threads that ran it
    stage_cpu_s: dict[str, float] = field(default_factory=dict)


class StageClock:
    """CPU time per stage of the pipeline, summed over its threads. time.thread_time counts the
    calling thread only: a session with more than one thread per image runs part of its work on
    onnxruntime's own pool threads, which are not in it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def timed(self, stage: str, work: Callable, *args):
        start = time.thread_time()
        try:
            return work(*args)
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + spent


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
    if logits.shape[0] == 1:
        return np.zeros(logits.shape[1:], np.uint8)
    ids = np.greater(logits[1], logits[0]).view(np.uint8)  # class 1 where it beats class 0
    best = np.maximum(logits[0], logits[1])
    for c in range(2, logits.shape[0]):
        better = np.greater(logits[c], best)
        np.copyto(ids, np.uint8(c), where=better)
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
    overlay_path = folder / f"{item.path.stem}_overlay.jpg"
    save_png(mask_path, mask, palette=info["palette"], compress_level=PNG_LEVEL)
    if with_overlay:
        blended = overlay(image, mask, info["colours"])
        save_jpeg(overlay_path, blended, OVERLAY_JPEG_QUALITY)
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
    images: list[Path], max_side: int, window: int, pool, run: PipelineRun, on_skip, clock
) -> Iterator[Decoded]:
    """The decoded images in input order, up to `window` decoding ahead on `pool`; unreadable
    ones are reported to `on_skip` and recorded in `run.skipped`."""
    pending: deque[Future] = deque()
    upcoming = iter(enumerate(images))
    for position, path in upcoming:
        pending.append(pool.submit(clock.timed, "decode", decode, position, path, max_side))
        if len(pending) >= window:
            break
    while pending:
        outcome = pending.popleft().result()
        following = next(upcoming, None)
        if following is not None:
            pending.append(pool.submit(clock.timed, "decode", decode, *following, max_side))
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
    clock = StageClock()
    started = time.perf_counter()
    # Batches handed to the model threads and not yet done: a model thread that finishes one
    # takes the next from the executor's queue without waiting for the main thread.
    model_slots = threading.BoundedSemaphore(runs * (1 + BATCHES_QUEUED))
    # Images whose masks are being written: a model thread waits only when the writers fall
    # this far behind.
    write_slots = threading.BoundedSemaphore(runs * batch * WRITES_IN_FLIGHT)
    writers = max(1, round(runs * WRITERS_PER_RUN))
    inferred: deque[Future] = deque()  # per batch: (session seconds, [(position, write)])
    done: list[tuple[int, dict]] = []

    def infer_and_hand_over(group: list[Decoded]) -> tuple[float, list[tuple[int, Future]]]:
        try:
            inputs = np.stack([item.model_input.transpose(2, 0, 1) for item in group])
            feed = {INPUT_NAME: inputs.astype(np.float32)}
            start = time.perf_counter()
            (logits,) = clock.timed("session", session.run, [OUTPUT_NAME], feed)
            elapsed = time.perf_counter() - start
            writes = []
            for item, item_logits in zip(group, logits, strict=True):
                write_slots.acquire()
                future = writer.submit(
                    clock.timed, "write", write, item, item_logits, info, folder_for(item.path),
                    elapsed * 1000, len(group), with_overlay,
                )  # fmt: skip
                future.add_done_callback(lambda _: write_slots.release())
                writes.append((item.position, future))
            return elapsed, writes
        finally:
            model_slots.release()

    def report(wait: bool) -> None:
        """Report finished images in input order; with `wait`, all of them."""
        while inferred and (wait or inferred[0].done()):
            elapsed, writes = inferred[0].result()
            while writes and (wait or writes[0][1].done()):
                position, future = writes.pop(0)
                result = future.result()
                on_result(result)
                done.append((position, result))
            if writes:
                return
            inferred.popleft()
            run.session_s += elapsed

    with (
        ThreadPoolExecutor(1, thread_name_prefix="memseg-read") as reader,
        ThreadPoolExecutor(writers, thread_name_prefix="memseg-write") as writer,
        ThreadPoolExecutor(runs, thread_name_prefix="memseg-model") as model,  # closes first
    ):
        window = runs * batch + READ_AHEAD
        decoded = decoded_in_order(images, max_side, window, reader, run, on_skip, clock)
        for group in batches(decoded, batch):
            model_slots.acquire()
            inferred.append(model.submit(infer_and_hand_over, group))
            report(wait=False)
        report(wait=True)
    run.results = [result for _, result in sorted(done, key=lambda pair: pair[0])]
    run.wall_s = time.perf_counter() - started
    run.stage_cpu_s = dict(clock.seconds)
    return run
