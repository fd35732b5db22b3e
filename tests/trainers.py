"""Trainers on random batches for step tests: the embedded preset at test sizes, with the memory
bank, the contrastive loss and the class weights live from the first step."""

from __future__ import annotations

from memseg_bench.config import config_from_dict, deep_merge
from memseg_bench.data.random_batches import RandomBatches
from memseg_bench.engine import TrainData, Trainer
from memseg_bench.runs import RunSpec

NUM_CLASSES = 4

FROM_THE_FIRST_STEP = {
    "model": {"weights": None},
    "train": {
        "val_every": 0,
        "log_every": 10**9,
        "checkpoint_every": 10**9,
        "iterations": 10**6,
    },
    "methods": {
        "phase_start": "at",  # start 0 is on at step 0 under either behaviour
        "selftrain": {"class_weights_start": 0},
        "memseg": {"memory_start": 0, "contrastive_start": 0, "quality_filter": False},
    },
}


def tiny_config(behaviour: str = "paper", overrides: dict | None = None):
    values = {
        "preset": "embedded",
        "train": {"crop": 32, "batch_labeled": 2, "batch_unlabeled": 2},
        "methods": {"behaviour": behaviour},
    }
    values = deep_merge(deep_merge(values, overrides or {}), FROM_THE_FIRST_STEP)
    return config_from_dict(values)


def random_data(batch: int = 2, crop: int = 32, labeled_seed: int = 0, unlabeled_seed: int = 1):
    return TrainData(
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        palette=[[i, i, i] for i in range(NUM_CLASSES)],
        n_labeled=20,
        split_hash=None,
        labeled=RandomBatches(batch, crop, NUM_CLASSES, labeled_seed),
        unlabeled=RandomBatches(batch, crop, NUM_CLASSES, unlabeled_seed),
    )


def make_trainer(method: str, config, tmp_path, record=None) -> Trainer:
    spec = RunSpec(method, "test", 20, 0)
    return Trainer(config, spec, tmp_path, tmp_path, data=random_data(), method=record)
