"""Per-phase wall-clock timing of a training step (synchronising the device at phase edges).
Disabled by default: then it costs nothing and never synchronises."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def labeled_images_per_s(steps: int, batch_labeled: int, world_size: int, seconds: float) -> float:
    """Training throughput as every table states it: labeled images per second over all ranks
    (unlabeled images, teacher passes and views are work per labeled image, not images)."""
    return steps * batch_labeled * world_size / max(seconds, 1e-9)


class PhaseTimer:
    def __init__(self, device: torch.device | None = None, enabled: bool = False):
        self.device = device
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.totals.clear()
