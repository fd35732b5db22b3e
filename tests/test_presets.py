"""Every shipped preset trains memseg for a few iterations and evaluates, from the CLI, on a tiny
fake tree in its dataset's on-disk layout. The preset's model, normalisation, input scale, method
settings and evaluation mode are kept; sizes, schedule and weights are shrunk to test scale."""

import json
from pathlib import Path

import pytest
import yaml

from memseg_bench.config import available_presets, config_from_dict
from tests import fakes
from tests.project import memseg

N_LABELED = 3


def fake_tree(name: str, root: Path) -> None:
    if name == "voc":
        fakes.make_voc(root, train=6, val=2, size=(40, 48))
    elif name == "cityscapes":
        fakes.make_cityscapes(root, per_city=3, size=(48, 64))
    elif name == "folder":
        fakes.make_folder(root, counts={"train": 6, "val": 2, "test": 2}, size=(36, 48))
    else:
        assert name == "synthetic", name


def tiny_params(preset: str, data_root: Path) -> dict:
    data = {"root": str(data_root), "workers": 0}
    if preset == "embedded":
        data["synthetic"] = {"n_train": 6, "n_val": 2, "n_test": 2, "size": 32}
    return {
        "preset": preset,
        "data": data,
        "split": {
            "family": "test",
            "seed_suffix": "",
            "n_labeled": [N_LABELED],
            "n_unlabeled": None,
        },
        "model": {"weights": None},
        "train": {
            "iterations": 3,
            "crop": 32,
            "batch_labeled": 2,
            "batch_unlabeled": 1,
            "threads": 1,
            "log_every": 1,
            "checkpoint_every": 100,
            "val_every": 0,
        },
        "methods": {"memseg": {"memory_start": 0, "contrastive_start": 1}},
        "evaluate": {"window": 32, "stride": 24, "batch": 2},
        "sweep": {
            "n_labeled": [N_LABELED],
            "seeds": [0],
            "full_n_labeled": 6,
            "ablations": [],
            "ablation_n_labeled": N_LABELED,
        },
    }


@pytest.mark.parametrize("preset", available_presets())
def test_preset_trains_and_evaluates_on_a_fake_tree(preset, tmp_path):
    shipped = config_from_dict({"preset": preset})
    data_root = tmp_path / "data"
    fake_tree(shipped.data.name, data_root)
    params = tiny_params(preset, data_root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    memseg(tmp_path, "splits", "draw", "--n", str(N_LABELED), "--n", "6", "--family", "test")
    if shipped.data.name == "synthetic":
        memseg(tmp_path, "prepare")

    memseg(tmp_path, "train", "--method", "memseg", "--n-labeled", str(N_LABELED))
    run = f"runs/memseg-n{N_LABELED}-s0"
    memseg(tmp_path, "evaluate", "--run", run, "--metrics-dir", "metrics")

    curve = (tmp_path / "reports" / "curves" / f"memseg-n{N_LABELED}-s0.csv").read_text()
    assert "loss_contr_lab" in curve.splitlines()[0]
    metrics = json.loads((tmp_path / "metrics" / f"memseg-n{N_LABELED}-s0.json").read_text())
    protocol = metrics["protocol"]
    assert protocol["arch"] == shipped.model.arch
    assert protocol["backbone"] == shipped.model.backbone
    assert protocol["eval_mode"] == shipped.evaluate.mode
    assert protocol["dataset"] == (shipped.split.dataset or shipped.data.name)
    assert 0.0 <= metrics["miou"] <= 1.0
    classes = {"voc": 21, "cityscapes": 19}.get(shipped.data.name)
    if classes is None:
        classes = len(json.loads((data_root / "classes.json").read_text())["classes"])
    assert len(metrics["per_class_iou"]) == classes
