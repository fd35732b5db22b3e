"""`memseg init`: a folder dataset to its own splits, params, pipeline and protocol table."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from memseg_bench.config import load_config
from memseg_bench.data.splits import read_ids
from memseg_bench.data.synthetic import render_sample
from memseg_bench.errors import UserError
from memseg_bench.own_dataset import init_dataset, label_counts, pipeline_yaml
from tests.project import memseg

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["background", "disc", "square", "triangle", "ring", "cross", "star"]
# A short schedule so that every stage of the pipeline runs in seconds.
TINY = [
    "train.iterations=8",
    "split.n_unlabeled=null",  # the embedded preset's 80 is more than this dataset holds
    "train.crop=32",
    "train.batch_labeled=2",
    "train.batch_unlabeled=2",
    "train.threads=1",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.val_every=4",
    "methods.selftrain.ramp_iterations=4",
    "methods.memseg.memory_start=2",
    "methods.memseg.contrastive_start=4",
    "export.parity_sizes=[[32, 32]]",
]


def write_folder_dataset(root: Path, counts: dict[str, int], size: int = 32) -> None:
    """The generic layout with JPEG photos: images/<split>/<id>.jpg, labels/<split>/<id>.png."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(count):
            image, label = render_sample(rng, size)
            Image.fromarray(image).save(root / "images" / split / f"{split}{k:03d}.jpg", quality=92)
            Image.fromarray(label).save(root / "labels" / split / f"{split}{k:03d}.png")
    (root / "classes.json").write_text(json.dumps({"classes": CLASSES}))


# -- pieces ------------------------------------------------------------------------------------


def test_label_counts_take_fractions_and_counts():
    assert label_counts(["1/8", "0.25", "46", "1/4"], 367) == [46, 92]
    for bad in ["0", "367", "1/1", "x", "1/0", "-3"]:
        with pytest.raises(UserError, match="--labeled"):
            label_counts([bad], 367)


def test_the_camvid_pipeline_is_the_template_one():
    committed = (REPO / "pipelines" / "camvid" / "dvc.yaml").read_text()
    assert committed == pipeline_yaml("camvid", "camvid")
    mine = yaml.safe_load(pipeline_yaml("leaves", "voc_v3p_r50"))["stages"]
    assert mine["prepare"]["deps"][-2:] == [
        "memseg_bench/presets/voc_v3p_r50.yaml",
        "splits/leaves",
    ]
    assert "--runs-dir runs_leaves" in mine["train"]["cmd"]
    assert mine["report"]["metrics"] == [{"reports/leaves/summary.json": {"cache": False}}]


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder_dataset(tmp_path / "photos", {"train": 16, "val": 4, "test": 4})
    return Path("photos")


def test_init_writes_a_loadable_protocol(photos):
    made = init_dataset(photos, "shapes", labeled=("1/4", "8"), seeds=2, settings=("train.lr=1",))
    assert made["command"] == "dvc repro pipelines/shapes/dvc.yaml"
    config = load_config("pipelines/shapes/params.yaml")
    assert (config.data.name, config.data.root) == ("folder", "photos")
    assert config.split.dataset == "shapes"
    assert config.train.lr == 1.0 and config.train.iterations == 4000  # --set, then the preset
    assert config.sweep.n_labeled == (4, 8) and config.sweep.full_n_labeled == 16
    assert config.export.run == "memseg-n4-s0"
    draws = [read_ids(Path(f"splits/shapes/random_s{s}/4/labeled.txt")) for s in (0, 1)]
    assert draws[0] != draws[1]  # each seed its own draw
    eight = read_ids(Path("splits/shapes/random_s0/8/labeled.txt"))
    assert eight[:4] == draws[0] and len(set(eight)) == 8  # nested
    assert len(read_ids(Path("splits/shapes/random_s1/16/labeled.txt"))) == 16
    assert "random_s1" in Path("splits/shapes/PROVENANCE.md").read_text()
    assert Path("pipelines/shapes/dvc.yaml").read_text() == pipeline_yaml("shapes", "camvid")


def test_init_refuses_what_would_overwrite_or_fail_later(photos):
    init_dataset(photos, "shapes", seeds=1)
    before = Path("pipelines/shapes/params.yaml").read_text()
    with pytest.raises(UserError, match="pipelines/shapes exists"):
        init_dataset(photos, "shapes", seeds=1)
    assert Path("pipelines/shapes/params.yaml").read_text() == before
    with pytest.raises(UserError, match="train.lrr"):
        init_dataset(photos, "other", settings=("train.lrr=1",))
    with pytest.raises(UserError, match="--set"):
        init_dataset(photos, "other", settings=("train.lr",))
    with pytest.raises(UserError, match="--name"):
        init_dataset(photos, "My Data")
    assert not Path("pipelines/other").exists() and not Path("splits/other").exists()
    shutil.rmtree(photos / "images" / "test")
    with pytest.raises(UserError, match="images/test"):
        init_dataset(photos, "other")


# -- the README walkthrough --------------------------------------------------------------------


def test_readme_walkthrough_from_folder_to_table(tmp_path):
    """data check, init, dvc repro of the written pipeline: a protocol table of its own."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own dataset", 1)[1].split("\n## ", 1)[0]
    for command in ("memseg data check --dataset folder", "memseg init", "dvc repro pipelines/"):
        assert command in section
    project = tmp_path / "project"
    shutil.copytree(
        REPO / "memseg_bench",
        project / "memseg_bench",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    write_folder_dataset(project / "photos", {"train": 12, "val": 4, "test": 4})
    memseg(project, "data", "check", "--dataset", "folder", "--root", "photos")
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    out = memseg(
        project, "init", "photos", "--name", "shapes", "--preset", "embedded",
        "--labeled", "1/4", "--seeds", "1", *sets,
    ).stdout  # fmt: skip
    assert "dvc repro pipelines/shapes/dvc.yaml" in out and "reports/shapes/tables" in out
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    result = subprocess.run(
        [*dvc, "repro", "pipelines/shapes/dvc.yaml"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = re.sub(
        r" {2,}", " ", (project / "reports" / "shapes" / "tables" / "main.md").read_text()
    )
    assert table.startswith("### Main results: shapes/random/")
    assert "| method | 3 labeled | 12 labeled |" in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    for method in ("supervised", "selftrain", "memseg"):
        assert "(n=1)" in rows[method]
    assert rows["supervised"].count("(n=1)") == 2  # 3 labels and all 12
    summary = json.loads((project / "reports" / "shapes" / "summary.json").read_text())
    assert summary["num_runs"] == 4
    assert (project / "splits" / "shapes" / "random_s0" / "3" / "labeled.txt").is_file()
    assert not (project / "reports" / "tables").exists()  # nothing mixed into the default's
