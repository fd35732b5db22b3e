"""The training loop shared by every method: data streams, optimiser, teacher and memory bank
when the method asks for them, logging, validation and atomic checkpoints with exact resume.
What a method does is in its `Method` record (methods/method.py); this loop calls its hooks."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, distributed
from .config import Config, config_hash, config_to_dict, dump_config
from .errors import UserError
from .fileio import write_json, write_text
from .methods.method import Method
from .runs import RunSpec, device_name, git_commit, peak_memory, seed_everything
from .timing import labeled_images_per_s


@dataclass
class Curve:
    """Training curve rows; written whole and atomically at every log step."""

    rows: list[dict] = field(default_factory=list)
    bank_rows: list[dict] = field(default_factory=list)

    def write(self, path: Path, bank_path: Path) -> None:
        write_text(path, _csv(self.rows))
        if self.bank_rows:
            write_text(bank_path, _csv(self.bank_rows))


def _csv(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = [",".join(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key, "")
            cells.append(f"{value:.6g}" if isinstance(value, float) else str(value))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - step / total) ** power


def make_optimizer(parameters, train) -> torch.optim.Optimizer:
    if train.optimizer == "adamw":
        # The fused kernel takes a quarter of the time of the per-tensor loop on a CPU.
        return torch.optim.AdamW(
            parameters, lr=train.lr, weight_decay=train.weight_decay, fused=True
        )
    return torch.optim.SGD(
        parameters, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
    )


def build_models(config: Config, method: Method, num_classes: int, device: torch.device):
    from .models import build_heads, build_segmenter

    net = build_segmenter(config.model, num_classes, config.data.mean, config.data.std)
    if config.train.bn_momentum is not None:
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = config.train.bn_momentum
    if config.train.sync_bn and torch.distributed.is_initialized():
        # Only the segmenter: the heads normalise over each rank's own pixels of a class.
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if config.train.compile:
        net.compile()  # in place: state_dict keys stay those of the plain module
    parts = {"net": net}
    if method.needs_bank:
        parts["heads"] = build_heads(net.feature_channels, num_classes, config.model.feature_dim)
    model = nn.ModuleDict(parts)
    model = model.to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = None
    if method.needs_teacher:
        teacher = copy.deepcopy(model).requires_grad_(False)
    return model, teacher


@dataclass
class TrainData:
    """Where a run's batches come from: the dataset's split streams, or random tensors (bench)."""

    class_names: list[str]
    palette: list[list[int]]
    n_labeled: int
    split_hash: str | None
    labeled: object  # iterator of {"image", "label"} batches with state() / load_state()
    unlabeled: object | None
    index: object | None = None
    n_unlabeled: int = 0


def open_train_data(
    config: Config, spec: RunSpec, dist: distributed.Dist, needs_unlabeled: bool
) -> TrainData:
    from .data.datasets import open_dataset
    from .data.loader import BatchStream, SegmentationDataset
    from .data.splits import load_split, split_hash, unlabeled_subset

    train = config.train
    index = open_dataset(config.data)
    family = spec.split_family(config)
    labeled_ids, unlabeled_ids = load_split(
        Path("splits"), config.split.dataset or config.data.name, family, spec.n_labeled
    )

    def stream(ids, batch, offset):
        dataset = SegmentationDataset(
            index,
            "train",
            ids,
            crop=train.crop,
            train=True,
            seed=spec.seed + offset,
            input_scale=config.data.input_scale,
        )
        return BatchStream(
            dataset,
            batch,
            seed=spec.seed + offset,
            rank=dist.rank,
            world_size=dist.world_size,
            workers=config.data.workers,
            pin_memory=dist.device.type == "cuda",
        )

    drawn_split = split_hash(labeled_ids, unlabeled_ids)
    unlabeled = None
    if needs_unlabeled:
        if not unlabeled_ids:
            raise UserError(
                f"split {family}/{spec.n_labeled} has no unlabeled images for {spec.method}"
            )
        if config.split.n_unlabeled is not None:
            unlabeled_ids = unlabeled_subset(unlabeled_ids, config.split.n_unlabeled, spec.seed)
        unlabeled = stream(unlabeled_ids, train.batch_unlabeled, 7919)
    return TrainData(
        class_names=list(index.class_names),
        palette=[list(c) for c in index.palette],
        n_labeled=len(labeled_ids),
        split_hash=drawn_split,
        labeled=stream(labeled_ids, train.batch_labeled, 0),
        unlabeled=unlabeled,
        index=index,
        n_unlabeled=len(unlabeled_ids) if needs_unlabeled else 0,
    )


class Trainer:
    def __init__(
        self,
        config: Config,
        spec: RunSpec,
        runs_dir: Path,
        curves_dir: Path,
        data: TrainData | None = None,
        method: Method | None = None,
    ):
        from .methods import METHODS
        from .methods.context import StepContext

        self.config = config
        self.spec = spec
        self.method = method or METHODS[spec.method]
        self.dist = distributed.setup()
        self.device = self.dist.device
        self.run_dir = runs_dir / spec.name
        self.curve_path = curves_dir / f"{spec.name}.csv"
        self.bank_curve_path = curves_dir / f"{spec.name}.bank.csv"
        train = config.train
        if train.threads > 0:
            torch.set_num_threads(train.threads)
        torch.use_deterministic_algorithms(train.deterministic, warn_only=True)
        # Filling every new tensor with NaN would only catch reads of uninitialised memory.
        torch.utils.deterministic.fill_uninitialized_memory = False
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not train.deterministic
        seed_everything(spec.seed * 1000 + self.dist.rank)

        self.data = data or open_train_data(config, spec, self.dist, self.method.needs_unlabeled)
        self.labeled_stream = self.data.labeled
        self.unlabeled_stream = self.data.unlabeled
        self.n_labeled = self.data.n_labeled
        self.num_classes = len(self.data.class_names)

        self.model, self.teacher = build_models(config, self.method, self.num_classes, self.device)
        if self.dist.enabled:
            distributed.broadcast_state(self.model, self.dist)
            if self.teacher is not None:
                distributed.broadcast_state(self.teacher, self.dist)
        self.optimizer = make_optimizer(self.model.parameters(), train)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(spec.seed * 1000 + self.dist.rank)
        bank = None
        if self.method.new_bank is not None:
            bank = self.method.new_bank(config, self.num_classes, self.device)
        self.ctx = StepContext(
            config=config,
            num_classes=self.num_classes,
            n_labeled=self.n_labeled,
            model=self.model,
            teacher=self.teacher,
            bank=bank,
            generator=generator,
            n_unlabeled=self.data.n_unlabeled,
            gather=lambda tensors: distributed.gather_rows(tensors, self.dist),
            world_size=self.dist.world_size,
        )
        self.losses = self.method.losses
        self.step = 0
        self.elapsed = 0.0
        self.curve = Curve()
        self.best_val: dict | None = None
        # With train.reload_best_after: the student's state at the best validation (on the CPU)
        # and the iterations validated since without a higher val mIoU.
        self.best_model: dict | None = None
        self.since_best = 0

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def rank_state(self) -> dict:
        """What differs between ranks: random generators and positions in the data streams."""
        return {
            "generator": self.ctx.generator.get_state(),
            "rng": checkpoint.rng_state(),
            "labeled_stream": self.labeled_stream.state(),
            "unlabeled_stream": None
            if self.unlabeled_stream is None
            else self.unlabeled_stream.state(),
        }

    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.ctx.bank,
            "extra_state": self.ctx.extra_state,
            "rank_states": distributed.gather_objects(self.rank_state(), self.dist),
            "curve": self.curve.rows,
            "bank_curve": self.curve.bank_rows,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "best_model": self.best_model,
            "since_best": self.since_best,
            "config": config_to_dict(self.config),
            "config_hash": config_hash(self.config),
        }

    def save_checkpoint(self) -> None:
        state = self.state()
        if self.dist.is_main:
            checkpoint.save(self.checkpoint_path, state)
        distributed.barrier(self.dist)

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = checkpoint.load(self.checkpoint_path, map_location=self.device)
        if state["config_hash"] != config_hash(self.config):
            raise UserError(
                f"{self.checkpoint_path} was written with another configuration "
                f"(hash {state['config_hash']}); delete it or restore the params it used"
            )
        self.model.load_state_dict(state["model"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["bank"] is not None:
            self.ctx.bank = {k: v.to(self.device) for k, v in state["bank"].items()}
        self.ctx.extra_state = state["extra_state"]
        if len(state["rank_states"]) != self.dist.world_size:
            raise UserError(
                f"{self.checkpoint_path} was written by {len(state['rank_states'])} processes; "
                f"resume it with the same number (now {self.dist.world_size})"
            )
        mine = state["rank_states"][self.dist.rank]
        self.ctx.generator.set_state(mine["generator"].cpu())
        checkpoint.set_rng_state(mine["rng"])
        self.labeled_stream.load_state(mine["labeled_stream"])
        if self.unlabeled_stream is not None:
            self.unlabeled_stream.load_state(mine["unlabeled_stream"])
        self.curve = Curve(state["curve"], state["bank_curve"])
        self.step = state["step"]
        self.elapsed = state["elapsed"]
        self.best_val = state["best_val"]
        self.best_model = state.get("best_model")
        self.since_best = state.get("since_best", 0)
        return True

    # -- one iteration -------------------------------------------------------------------------

    def _batch(self, stream) -> dict:
        """The batch's tensors ("image", "label" and, from the datasets, "valid") on the device."""
        batch = next(stream)
        return {
            key: value.to(self.device, non_blocking=True)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
        }

    def train_step(self) -> dict[str, torch.Tensor]:
        from .models.grouped_mlp import GroupedMLP

        train = self.config.train
        lr = poly_lr(train.lr * train.lr_multiplier, self.step, train.iterations, train.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        timer = self.ctx.timer
        with timer("data"):
            labeled = self._batch(self.labeled_stream)
            unlabeled = None
            if self.unlabeled_stream is not None:
                unlabeled = self._batch(self.unlabeled_stream)
        if train.channels_last:
            labeled["image"] = labeled["image"].contiguous(memory_format=torch.channels_last)
        self.model.train()
        if train.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, (nn.modules.batchnorm._BatchNorm, GroupedMLP)):
                    module.eval()
        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=train.amp == "bf16"
        )
        with autocast:
            terms, student = self.losses(self.ctx, labeled, unlabeled, self.step)
        loss = sum(terms.values())
        with timer("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist.enabled:
                distributed.average_gradients(self.model, self.dist)
        with timer("optimizer_ema"):
            self.optimizer.step()
            if self.dist.enabled:
                distributed.broadcast_state(self.model, self.dist, buffers_only=True)
            if self.method.update_teacher is not None:
                self.method.update_teacher(self.ctx, self.step)
        after_logs = {}
        if self.method.after_step is not None:
            with autocast:
                after_logs = self.method.after_step(self.ctx, student, self.step)
        self.step += 1
        logs = {f"loss_{name}": value.detach() for name, value in terms.items()}
        logs["loss"] = loss.detach()
        logs["lr"] = torch.tensor(lr)
        logs.update(student.diagnostics)
        logs.update(after_logs)
        return logs

    # -- the loop ------------------------------------------------------------------------------

    def log(self, logs: dict[str, torch.Tensor], rate: float) -> None:
        logs = distributed.mean_across_ranks(logs, self.dist)
        row = {"step": self.step, **{k: float(v) for k, v in logs.items()}}
        if self.method.curve_columns is not None:
            columns, class_row = self.method.curve_columns(self.ctx, self.data.class_names)
            row.update(columns)
            if class_row is not None:
                self.curve.bank_rows.append({"step": self.step, **class_row})
        row["images_per_s"] = rate
        row["time_s"] = self.elapsed
        self.curve.rows.append(row)
        if self.dist.is_main:
            self.curve.write(self.curve_path, self.bank_curve_path)

    def validate(self) -> None:
        from .scoring import score_split

        if self.dist.is_main:
            scores = score_split(
                self.model["net"], self.data.index, "val", self.config, self.device, progress=False
            )
            self.curve.rows[-1]["val_miou"] = scores["miou"]
            self.curve.write(self.curve_path, self.bank_curve_path)
            improved = self.best_val is None or scores["miou"] > self.best_val["val_miou"]
            if improved:
                self.best_val = {"val_miou": scores["miou"], "step": self.step}
                self.save_model(self.run_dir / "best.pt")
            if self.config.train.reload_best_after is not None:
                if improved:
                    state = self.model.state_dict()
                    self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
                    self.since_best = 0
                else:
                    self.since_best += self.config.train.val_every
        distributed.barrier(self.dist)

    def reload_best_if_stalled(self) -> None:
        """Once the validations have gone more than train.reload_best_after x T iterations
        without a higher val mIoU, the student takes back its best-on-val state and the teacher
        restarts as a copy of it; the optimiser state, the LR schedule, the memory bank and the
        step go on."""
        train = self.config.train
        stalled = self.since_best > train.reload_best_after * train.iterations
        if self.dist.enabled:
            stalled = distributed.gather_objects(stalled, self.dist)[0]  # rank 0 validates
        if not stalled:
            return
        if self.dist.is_main:
            self.model.load_state_dict(self.best_model)
            self.curve.rows[-1]["reloaded_best_step"] = self.best_val["step"]
            self.curve.write(self.curve_path, self.bank_curve_path)
        distributed.broadcast_state(self.model, self.dist)
        if self.teacher is not None:
            self.teacher.load_state_dict(self.model.state_dict())
        self.since_best = 0

    def recalibrate_bn(self) -> None:
        """train.bn_recalibration_batches batches of the unlabeled stream (the labeled one in a
        run without) through the student's segmenter, for its BatchNorm statistics."""
        from .bn_recalibration import recalibrate_batchnorm

        train = self.config.train
        stream = self.unlabeled_stream if self.unlabeled_stream is not None else self.labeled_stream

        def images():
            for _ in range(train.bn_recalibration_batches):
                image = self._batch(stream)["image"]
                if train.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                yield image

        autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=train.amp == "bf16"
        )
        with autocast:
            recalibrate_batchnorm(self.model["net"], images())
        distributed.broadcast_state(self.model["net"], self.dist, buffers_only=True)

    def save_model(self, path: Path) -> None:
        net = self.model["net"]
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        checkpoint.save(
            path,
            {
                "model_state": state,
                "config": config_to_dict(self.config),
                "config_hash": config_hash(self.config),
                "class_names": list(self.data.class_names),
                "palette": self.data.palette,
                "step": self.step,
            },
        )

    def fit(self, progress: bool = True) -> dict:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        train = self.config.train
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", dump_config(self.config))
        bar = Progress(
            TextColumn(f"[bold]{self.spec.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not (progress and self.dist.is_main),
        )
        window_start, window_steps = time.perf_counter(), 0
        with bar:
            task = bar.add_task(
                "train", total=train.iterations, completed=self.step, loss=math.nan, lr=0.0, rate=""
            )
            while self.step < train.iterations:
                started = time.perf_counter()
                logs = self.train_step()
                self.elapsed += time.perf_counter() - started
                window_steps += 1
                last = self.step == train.iterations
                # A validation gets a curve row of its own step, also between log steps.
                validating = bool(train.val_every) and (self.step % train.val_every == 0 or last)
                if self.step % train.log_every == 0 or last or validating:
                    now = time.perf_counter()
                    seconds = now - window_start
                    rate = labeled_images_per_s(
                        window_steps, train.batch_labeled, self.dist.world_size, seconds
                    )
                    self.log(logs, rate)
                    bar.update(
                        task,
                        completed=self.step,
                        loss=float(logs["loss"]),
                        lr=float(logs["lr"]),
                        rate=f"{window_steps / seconds:.2f} it/s",
                    )
                    window_start, window_steps = now, 0
                else:
                    bar.update(task, completed=self.step)
                if validating:
                    self.validate()
                    if train.reload_best_after is not None and not last:
                        self.reload_best_if_stalled()
                if self.step % train.checkpoint_every == 0 or last:
                    self.save_checkpoint()
        return self.finish()

    def finish(self) -> dict:
        if self.config.train.bn_recalibration_batches:
            self.recalibrate_bn()
        batch = self.config.train.batch_labeled
        images_per_s = labeled_images_per_s(self.step, batch, self.dist.world_size, self.elapsed)
        summary = {
            "run": self.spec.name,
            "method": self.spec.method,
            "variant": self.spec.variant,
            "family": self.spec.family,
            "split_family": self.spec.split_family(self.config),
            "n_labeled": self.spec.n_labeled,
            "seed": self.spec.seed,
            "steps": self.step,
            "best_val": self.best_val,
            "compute": {
                "wall_time_s": round(self.elapsed, 3),
                "images_per_s": round(images_per_s, 3),
                **peak_memory(self.device),
                "device": device_name(self.device),
                "world_size": self.dist.world_size,
                "torch": torch.__version__,
            },
            "provenance": {
                "git_commit": git_commit(),
                "config_hash": config_hash(self.config),
                "split_hash": self.data.split_hash,
            },
        }
        if self.dist.is_main:
            self.save_model(self.run_dir / "model.pt")
            write_json(self.run_dir / "train.json", summary)
        distributed.barrier(self.dist)
        return summary


def train(
    config: Config,
    spec: RunSpec,
    runs_dir: Path = Path("runs"),
    curves_dir: Path = Path("reports/curves"),
    resume: bool = False,
    progress: bool = True,
) -> dict:
    trainer = Trainer(config, spec, runs_dir, curves_dir)
    try:
        if resume:
            trainer.resume()
        elif trainer.checkpoint_path.exists() and trainer.dist.is_main:
            trainer.checkpoint_path.unlink()
        return trainer.fit(progress=progress)
    finally:
        distributed.teardown(trainer.dist)
