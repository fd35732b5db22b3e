"""Random batches shaped like a dataset's: for step benchmarks and tests that need no files."""

from __future__ import annotations

import torch


class RandomBatches:
    """Endless random batches shaped like real ones: images 0..255, blocky label maps and the
    crop-validity mask of the datasets' training batches (all valid)."""

    def __init__(self, batch: int, crop: int, num_classes: int, seed: int, pool: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.batch, self.crop, self.num_classes = batch, crop, num_classes
        # pool > 0: cycle through that many pinned batches, so that the "data" phase of a
        # benchmark measures the host-to-device copy rather than random number generation.
        self.pool = [self._draw() for _ in range(pool)]
        if pool and torch.cuda.is_available():
            self.pool = [{k: v.pin_memory() for k, v in b.items()} for b in self.pool]
        self.drawn = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.pool:
            self.drawn += 1
            return self.pool[self.drawn % len(self.pool)]
        return self._draw()

    def _draw(self) -> dict:
        image = torch.rand(self.batch, 3, self.crop, self.crop, generator=self.generator) * 255
        blocks = torch.randint(
            0, self.num_classes, (self.batch, 1, 8, 8), generator=self.generator
        ).float()
        label = torch.nn.functional.interpolate(blocks, size=(self.crop, self.crop))[:, 0].long()
        valid = torch.ones_like(label, dtype=torch.bool)  # no crop padding
        return {"image": image, "label": label, "valid": valid}

    def state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
