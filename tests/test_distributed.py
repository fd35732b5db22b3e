"""Two gloo processes on CPU: identical teachers and memory banks on every rank, a 2-rank step equal
to a single-process step on the union batch, and resume under 2 ranks.

Settings of the union-batch comparison: train.freeze_bn = true (SyncBatchNorm needs CUDA, and
per-rank batch statistics of half the batch differ from the union's), dropout off and no random
augmentation (each rank draws its own), methods selftrain and fixmatch: their losses are means
over equally many pixels per rank, so the average of the rank gradients is the union gradient.
The contrastive term normalises per class over each rank's own pixels, so memseg is compared rank
against rank only."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from memseg_bench.config import config_from_dict, deep_merge
from memseg_bench.data.random_batches import RandomBatches
from memseg_bench.engine import TrainData, Trainer
from memseg_bench.runs import make_spec
from tests.trainers import FROM_THE_FIRST_STEP

NUM_CLASSES = 4
CROP = 32


NO_AUGMENT = {
    "scale_prob": 0.0,
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "blur_prob": 0.0,
    "classmix_prob": 0.0,
}


# FixMatch without its random draws (each rank draws its own) and with every pixel counted.
DETERMINISTIC_FIXMATCH = {
    "threshold": 0.0,
    "strong": {"jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0, "cutmix_prob": 0.0},
}


def _config():
    values = {
        "methods": {"fixmatch": DETERMINISTIC_FIXMATCH},
        "preset": "embedded",
        "train": {
            "crop": CROP,
            "batch_labeled": 2,
            "batch_unlabeled": 2,
            # Adam's per-weight normalisation turns float-order noise in near-zero gradients
            # into whole steps; SGD keeps the one-process / two-rank comparison meaningful.
            "optimizer": "sgd",
            "lr": 0.02,
            "freeze_bn": True,
            "augment": {"labeled": NO_AUGMENT, "unlabeled": NO_AUGMENT},
        },
    }
    return config_from_dict(deep_merge(values, FROM_THE_FIRST_STEP))


def _without_dropout(trainer):
    teacher = [] if trainer.teacher is None else list(trainer.teacher.modules())
    for module in list(trainer.model.modules()) + teacher:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return trainer


class UnionBatches(RandomBatches):
    """Rank r of W takes rows [r*b, (r+1)*b) of one shared batch of W*b images."""

    def __init__(self, per_rank: int, rank: int, world: int, seed: int):
        super().__init__(per_rank * world, CROP, NUM_CLASSES, seed)
        self.rank, self.per_rank = rank, per_rank

    def __next__(self):
        batch = super().__next__()
        rows = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        return {k: v[rows] for k, v in batch.items()}


def _data(rank: int, world: int) -> TrainData:
    return TrainData(
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        palette=[[i, i, i] for i in range(NUM_CLASSES)],
        n_labeled=20,
        split_hash=None,
        labeled=UnionBatches(2 // world if world > 1 else 2, rank, world, 0),
        unlabeled=UnionBatches(2 // world if world > 1 else 2, rank, world, 1),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, task: str, method: str):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from pathlib import Path

    from memseg_bench import distributed

    config = _config()
    spec = make_spec(method, "dist", 20, 0)
    trainer = Trainer(config, spec, Path(out_dir), Path(out_dir), data=_data(rank, world))
    _without_dropout(trainer)
    try:
        if task == "steps":
            for _ in range(3):
                trainer.train_step()
        elif task == "resume":
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                trainer.train_step()
            trainer.save_checkpoint()
            resumed = Trainer(config, spec, Path(out_dir), Path(out_dir), data=_data(rank, world))
            _without_dropout(resumed)
            assert resumed.resume()
            from memseg_bench.checkpoint import rng_state, set_rng_state

            restored = rng_state()
            trainer.train_step()
            set_rng_state(restored)
            resumed.train_step()
            torch.save(
                {"model": resumed.model.state_dict(), "bank": resumed.ctx.bank},
                f"{out_dir}/resumed{rank}.pt",
            )
        torch.save(
            {
                "model": trainer.model.state_dict(),
                "teacher": None if trainer.teacher is None else trainer.teacher.state_dict(),
                "bank": trainer.ctx.bank,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        distributed.teardown(trainer.dist)


def _spawn(world: int, out_dir, task: str = "steps", method: str = "memseg"):
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (world, _free_port(), str(out_dir), task, method)
    mp.spawn(_worker, args=args, nprocs=world, join=True)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal_states(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0 or not a[key].is_floating_point():
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _spawn(2, out)
    return out


def test_teachers_and_banks_identical_across_ranks(two_rank_run):
    rank0, rank1 = _load(two_rank_run / "rank0.pt"), _load(two_rank_run / "rank1.pt")
    _assert_equal_states(rank0["teacher"], rank1["teacher"])
    _assert_equal_states(rank0["model"], rank1["model"])
    _assert_equal_states(rank0["bank"], rank1["bank"])
    assert int(rank0["bank"]["count"].sum()) > 0


@pytest.mark.parametrize("method", ["selftrain", "fixmatch"])
def test_two_ranks_match_one_process_on_the_union_batch(method, tmp_path):
    _spawn(1, tmp_path / "one", method=method)
    _spawn(2, tmp_path / "two", method=method)
    single = _load(tmp_path / "one" / "rank0.pt")
    for rank in (0, 1):
        ranked = _load(tmp_path / "two" / f"rank{rank}.pt")
        _assert_equal_states(single["model"], ranked["model"], atol=1e-5)
        if single["teacher"] is not None:
            _assert_equal_states(single["teacher"], ranked["teacher"], atol=1e-5)


def test_resume_under_two_ranks(tmp_path):
    _spawn(2, tmp_path, task="resume")
    for rank in (0, 1):
        original = _load(tmp_path / f"rank{rank}.pt")
        resumed = _load(tmp_path / f"resumed{rank}.pt")
        _assert_equal_states(original["model"], resumed["model"], atol=1e-6)
        _assert_equal_states(original["bank"], resumed["bank"], atol=1e-6)
