"""Torch datasets over a DatasetIndex and infinite, resumable, sharded batch streams.

Randomness never comes from global state: a training item's crop is drawn from a generator
seeded by (seed, epoch, position in the epoch), so batches do not depend on the number of loader
workers, and a stream resumed from `state()` yields exactly the batches it would have yielded.
Scale / flip / colour augmentation happens later, batched on the device (data/augment.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from memseg_bench.data.datasets import DatasetIndex, load_sample
from memseg_bench.labels import IGNORE


def _resize(array: np.ndarray, scale: float, nearest: bool) -> np.ndarray:
    from PIL import Image

    height, width = array.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize(size, method))


def pad_and_crop(
    image: np.ndarray, label: np.ndarray, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to at least crop x crop (image 0, label ignore), then a random crop x crop window.
    Also returns where the window holds image pixels rather than padding (bool [crop, crop])."""
    height, width = label.shape
    inside = np.ones((height, width), dtype=bool)
    pad_h, pad_w = max(0, crop - height), max(0, crop - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
        inside = np.pad(inside, ((0, pad_h), (0, pad_w)), constant_values=False)
        height, width = label.shape
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    window = (slice(top, top + crop), slice(left, left + crop))
    return image[window], label[window], inside[window]


class SegmentationDataset(torch.utils.data.Dataset):
    """Items {"image": float32 [3, h, w] in 0..255, "label": int64 [h, w], "id": str}; training
    items also {"valid": bool [h, w]}: image pixels, not crop padding (what a method that must not
    read the labels of unlabeled images may still know).

    train=True: random crop x crop window (after padding); input_scale != 1 resizes image
    (bilinear) and label (nearest) first, as in the half-resolution Cityscapes protocol.
    train=False: the whole image; input_scale resizes the image only, the label stays full-size.
    An item is addressed by its index, or by (index, epoch, position) from a batch stream.
    """

    def __init__(
        self,
        index: DatasetIndex,
        split: str,
        ids: list[str],
        crop: int | None,
        train: bool,
        seed: int,
        input_scale: float = 1.0,
    ):
        if train and (crop is None or crop < 1):
            raise ValueError("a training dataset needs a positive crop size")
        if input_scale <= 0:
            raise ValueError(f"input_scale must be positive, got {input_scale}")
        self.index = index
        self.split = split
        self.ids = list(ids)
        self.crop = crop
        self.train = train
        self.seed = int(seed)
        self.input_scale = float(input_scale)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int, int]) -> dict:
        item, epoch, position = (key, 0, key) if isinstance(key, (int, np.integer)) else key
        name = self.ids[int(item)]
        image, label = load_sample(self.index, self.split, name)
        if self.input_scale != 1.0:
            image = _resize(image, self.input_scale, nearest=False)
            if self.train:
                label = _resize(label, self.input_scale, nearest=True)
        if self.train:
            words = [self.seed % 2**63, int(epoch), int(position)]
            image, label, valid = pad_and_crop(
                image, label, self.crop, np.random.default_rng(words)
            )
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "label": torch.from_numpy(label.astype(np.int64)),
            "id": name,
        }
        if self.train:
            item["valid"] = torch.from_numpy(np.ascontiguousarray(valid))
        return item


def epoch_plan(
    n_items: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> list[list[tuple[int, int, int]]]:
    """The batches of one epoch on one rank, as lists of (index, epoch, position) keys.

    A permutation seeded by (seed, epoch), tiled when the set is smaller than one global batch,
    padded by wrapping to a multiple of world_size and sharded rank::world_size (like
    DistributedSampler).
    """
    order = np.random.default_rng([seed % 2**63, epoch]).permutation(n_items)
    needed = batch_size * world_size
    if len(order) < needed:
        order = np.resize(order, needed)
    total = math.ceil(len(order) / world_size) * world_size
    order = np.resize(order, total)
    positions = np.arange(total)[rank::world_size]
    shard = order[rank::world_size]
    count = len(shard) // batch_size if drop_last else math.ceil(len(shard) / batch_size)
    batches = []
    for b in range(count):
        window = slice(b * batch_size, (b + 1) * batch_size)
        batches.append(
            [(int(i), epoch, int(p)) for i, p in zip(shard[window], positions[window], strict=True)]
        )
    return batches


class _BatchKeys:
    """The infinite sequence of batch keys from a start state (a DataLoader batch_sampler)."""

    def __init__(self, stream: BatchStream, epoch: int, position: int):
        self.stream, self.epoch, self.position = stream, epoch, position

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, position = self.epoch, self.position
        while True:
            plan = self.stream.plan(epoch)
            yield from plan[position:]
            epoch, position = epoch + 1, 0


class BatchStream:
    """An endless iterator of collated batches with `state()` / `load_state()` for resuming."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        start_state: dict | None = None,
    ):
        if len(dataset) == 0:
            raise ValueError("cannot stream batches from an empty dataset")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} of {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.batches_per_epoch = len(self.plan(0))
        self._iterator = None
        self.load_state(start_state or {"epoch": 0, "position": 0})

    def plan(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        return epoch_plan(
            len(self.dataset),
            self.batch_size,
            self.seed,
            epoch,
            self.rank,
            self.world_size,
            self.drop_last,
        )

    def state(self) -> dict:
        """Where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"bad stream state {state} ({self.batches_per_epoch} batches/epoch)")
        self.epoch, self.position = epoch, position
        self._iterator = None  # workers of an old iterator shut down when it is collected

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=_BatchKeys(self, self.epoch, self.position),
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                # Its own generator: creating an iterator must not draw from the global RNG,
                # or a resumed run would see other dropout masks than an uninterrupted one.
                generator=torch.Generator().manual_seed(self.seed),
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch
