"""The evaluate stage: score a finished run on its protocol's evaluation split and write the
metrics JSON that the report reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from memseg_bench import torchfile
from memseg_bench.config import Config, ModelConfig, stored_config
from memseg_bench.errors import UserError
from memseg_bench.fileio import read_json, write_json, write_text
from memseg_bench.run_metrics import Compute, Protocol, RunMetrics
from memseg_bench.runs import parse_run_name


def protocol(config: Config, family: str) -> dict:
    fields = {
        "dataset": config.split.dataset or config.data.name,
        "family": family,
        "arch": config.model.arch,
        "backbone": config.model.backbone,
        "crop": config.train.crop,
        "eval_mode": config.evaluate.mode,
        "iterations": config.train.iterations,
    }
    model = f"{fields['arch']}-{fields['backbone']}"
    widths = (config.model.decoder_channels, config.model.feature_dim)
    paper = ModelConfig()
    if widths != (paper.decoder_channels, paper.feature_dim):  # a protocol of its own
        model += f"-w{widths[0]}x{widths[1]}"
    if config.model.weights == "imagenet":  # packaged weights: the same start everywhere
        model += "-imagenet"
    fields["id"] = (
        f"{fields['dataset']}/{fields['family']}/{model}"
        f"/crop{fields['crop']}/{fields['eval_mode']}/it{fields['iterations']}"
    )
    return fields


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _score(model_file: Path, config: Config, index, split: str, device) -> dict:
    from memseg_bench.models import load_segmenter
    from memseg_bench.scoring import score_split

    segmenter, _ = load_segmenter(model_file)
    return score_split(segmenter.to(device), index, split, config, device)


def _stored_config(model_file: Path, summary: dict, summary_file: Path) -> Config:
    """The config in a model file, which must be the one its run trained under."""
    from memseg_bench.models import MODEL_FILE_KEYS

    stored = torchfile.load(model_file, "model file", mmap=True)
    if not isinstance(stored, dict) or any(key not in stored for key in MODEL_FILE_KEYS):
        raise UserError(
            f"model file {model_file} is not a memseg_bench model file: it lacks one of the "
            f"entries {list(MODEL_FILE_KEYS)}"
        )
    try:
        config = stored_config(stored["config"])
    except UserError as error:
        raise UserError(f"model file {model_file}: stored config is invalid: {error}") from None
    trained = summary.get("provenance", {}).get("config_hash")
    if stored["config_hash"] != trained:
        raise UserError(
            f"model file {model_file} was written under another protocol "
            f"({protocol(config, config.split.family)['id']}, config hash "
            f"{stored['config_hash']}) than {summary_file} records (config hash {trained})"
        )
    return config


def evaluate_run(run_dir: Path, metrics_dir: Path) -> dict:
    import torch

    from memseg_bench.data.datasets import open_dataset

    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        raise UserError(f"--run {run_dir}: no model.pt (train the run first)")
    summary = read_json(run_dir / "train.json")
    config = _stored_config(model_file, summary, run_dir / "train.json")
    spec = parse_run_name(run_dir.name, config.split.family)
    index = open_dataset(config.data)
    split = config.evaluate.split
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scores = _score(model_file, config, index, split, device)
    best = None
    if summary.get("best_val") and (run_dir / "best.pt").is_file():
        best_scores = _score(run_dir / "best.pt", config, index, split, device)
        best = {**summary["best_val"], "miou": best_scores["miou"]}
    result = RunMetrics(
        run=spec.name,
        method=spec.method,
        variant=spec.variant,
        split=f"{spec.split_family(config)}/{spec.n_labeled}",
        family=spec.family,
        n_labeled=spec.n_labeled,
        seed=spec.seed,
        behaviour=config.methods.behaviour,
        eval_split=split,
        protocol=Protocol(**protocol(config, spec.family)),
        miou=scores["miou"],
        pixel_accuracy=scores["pixel_accuracy"],
        mean_accuracy=scores["mean_accuracy"],
        per_class_iou=scores["per_class_iou"],
        class_names=list(index.class_names),
        best_val=best,
        compute=Compute(**summary["compute"]),
        provenance={**summary["provenance"], "checkpoint_hash": _sha256(model_file)},
    ).to_dict()
    lines = ["class,iou"] + [
        f"{name},{'' if value is None else f'{value:.6f}'}"
        for name, value in scores["per_class_iou"].items()
    ]
    write_text(metrics_dir / f"{spec.name}.per_class.csv", "\n".join(lines) + "\n")
    # The JSON, which the report reads, comes last: a killed run leaves none or both.
    write_json(metrics_dir / f"{spec.name}.json", result)
    return result
