"""Bad input to prepare / train / evaluate: a one-line error naming the file or key, exit 1, and
no half-written output."""

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.project import TINY_PARAMS, make_project, memseg, one_error_line


def _fails(result, *needles):
    one_error_line(result, *needles)


def _no_temporary_files(root: Path):
    leftovers = [p for p in root.rglob("*.tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("bad") / "p")
    memseg(root, "prepare")
    return root


def _copy(project: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "q"
    shutil.copytree(project, target, ignore=shutil.ignore_patterns("runs", "reports"))
    (target / "data" / "prepared.json").unlink()
    return target


def _train_image(root: Path) -> Path:
    return sorted((root / "data/synthetic/images/train").glob("*.png"))[0]


def _train_label(root: Path) -> Path:
    return sorted((root / "data/synthetic/labels/train").glob("*.png"))[0]


def test_missing_dataset_folder(tmp_path):
    params = copy.deepcopy(TINY_PARAMS)
    params["data"] = {"name": "folder", "root": str(tmp_path / "nowhere")}
    root = make_project(tmp_path / "p", params, draw=False)
    _fails(memseg(root, "prepare", check=False), "data.root", "nowhere")
    assert not (root / "data" / "prepared.json").exists()


def test_corrupt_image(project, tmp_path):
    root = _copy(project, tmp_path)
    image = _train_image(root)
    image.write_bytes(image.read_bytes()[:40])
    _fails(memseg(root, "prepare", check=False), image.name)
    assert not (root / "data" / "prepared.json").exists()
    _no_temporary_files(root)


def test_label_value_out_of_range(project, tmp_path):
    root = _copy(project, tmp_path)
    label = _train_label(root)
    array = np.array(Image.open(label))
    array[0, 0] = 17
    Image.fromarray(array).save(label)
    _fails(memseg(root, "prepare", check=False), label.name, "17")
    assert not (root / "data" / "prepared.json").exists()


def test_image_label_size_mismatch(project, tmp_path):
    root = _copy(project, tmp_path)
    label = _train_label(root)
    Image.fromarray(np.array(Image.open(label))[:-3]).save(label)
    _fails(memseg(root, "prepare", check=False), label.name)


def test_unknown_params_key(project, tmp_path):
    root = _copy(project, tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["learning_rate"] = 0.1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["prepare"], ["train", "--method", "supervised", "--n-labeled", "6"]):
        _fails(memseg(root, *command, check=False), "train.learning_rate")
    assert not (root / "runs").exists()


def test_split_naming_a_missing_image(project, tmp_path):
    from memseg_bench.data.splits import rebuild_manifest

    root = _copy(project, tmp_path)
    labeled = root / "splits/synthetic/random/6/labeled.txt"
    ids = labeled.read_text().splitlines()
    labeled.write_text("\n".join(["no_such_image"] + ids[1:]) + "\n")
    rebuild_manifest(root / "splits/synthetic")
    _fails(memseg(root, "prepare", check=False), "labeled.txt", "no_such_image")
    assert not (root / "data" / "prepared.json").exists()


def test_tampered_split_is_refused(project, tmp_path):
    root = _copy(project, tmp_path)
    labeled = root / "splits/synthetic/random/6/labeled.txt"
    ids = labeled.read_text().splitlines()
    labeled.write_text("\n".join(ids[1:] + ids[:1]) + "\n")
    _fails(memseg(root, "prepare", check=False), "MANIFEST.sha256")


def test_evaluate_a_missing_run(project):
    _fails(memseg(project, "evaluate", "--run", "runs/nothing-n6-s0", check=False), "model.pt")


def test_corrupt_image_during_training(project, tmp_path):
    root = _copy(project, tmp_path)
    memseg(root, "prepare")
    for image in sorted((root / "data/synthetic/images/train").glob("*.png")):
        image.write_bytes(b"not a png")
    result = memseg(root, "train", "--method", "supervised", "--n-labeled", "6", check=False)
    _fails(result, ".png")
    run = root / "runs" / "supervised-n6-s0"
    assert not (run / "model.pt").exists()
    _no_temporary_files(root)


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import torch

    from memseg_bench import checkpoint
    from memseg_bench.errors import UserError

    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint.save(path, {"step": 1})

    def write_then_fail(payload, file):
        Path(file).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8 vs 4")

    monkeypatch.setattr(torch, "save", write_then_fail)
    with pytest.raises(UserError, match=r"cannot write .*checkpoint\.pt: .* \(\d+ MiB free"):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path) == {"step": 1}
    _no_temporary_files(tmp_path)


def test_prepare_checks_only_the_splits_the_sweep_uses(project, tmp_path):
    root = _copy(project, tmp_path)
    params = copy.deepcopy(TINY_PARAMS)
    # no ablations asked for: their label count need not exist
    params["sweep"].update({"ablations": [], "ablation_n_labeled": 9, "ablation_seeds": [0]})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    memseg(root, "prepare")
    params["sweep"]["ablations"] = ["no_quality_filter"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(memseg(root, "prepare", check=False), "random/9 not found", "sweep.ablation_n_labeled")
    params["sweep"].update({"ablations": [], "n_labeled": [7]})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(memseg(root, "prepare", check=False), "random/7 not found", "sweep.n_labeled")
