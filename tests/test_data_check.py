import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from memseg_bench.data.check import check_dataset, print_check
from tests.fakes import make_camvid, make_cityscapes, make_folder, make_voc

CAMVID_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid_small"


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=120)


def ten_image_copy(target: Path) -> Path:
    """The first 6 train, 2 val and 2 test images of camvid_small, in the folder layout."""
    shutil.copy(CAMVID_SMALL / "classes.json", target / "classes.json")
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        ids = (CAMVID_SMALL / f"{split}.txt").read_text().split()[:n]
        for folder, ext in (("images", ".jpg"), ("labels", ".png")):
            (target / folder / split).mkdir(parents=True)
            for item in ids:
                shutil.copy(CAMVID_SMALL / folder / split / f"{item}{ext}", target / folder / split)
        (target / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return target


@pytest.mark.skipif(not CAMVID_SMALL.is_dir(), reason="../shared/data/camvid_small is absent")
def test_camvid_small_passes():
    # The whole copy (701 images) takes about 2-3 s here.
    problems, summary = check_dataset("folder", CAMVID_SMALL)
    assert problems == []
    assert {s: v["listed"] for s, v in summary["splits"].items()} == {
        "train": 367,
        "val": 101,
        "test": 233,
    }
    shares = summary["splits"]["train"]["class_share"]
    assert shares["road"] > 0.2 and shares["bicyclist"] < 0.01
    assert 0.02 < summary["splits"]["train"]["ignore_share"] < 0.06


@pytest.mark.skipif(not CAMVID_SMALL.is_dir(), reason="../shared/data/camvid_small is absent")
def test_broken_copy_lists_every_problem(tmp_path):
    root = ten_image_copy(tmp_path)
    assert print_check("folder", root, console=quiet()) == []
    ids = (root / "train.txt").read_text().split()
    (root / "images/train" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "labels/train" / f"{ids[1]}.png").unlink()
    label = np.asarray(Image.open(root / "labels/train" / f"{ids[2]}.png")).copy()
    label[5, 5] = 42
    Image.fromarray(label).save(root / "labels/train" / f"{ids[2]}.png")
    problems = print_check("folder", root, console=quiet())
    assert len(problems) == 3, problems
    text = "\n".join(problems)
    assert f"{ids[0]}.jpg" in text and "cannot read image" in text
    assert "1 labels missing" in text and f"{ids[1]}.png" in text
    assert f"{ids[2]}.png has value 42" in text
    limited, summary = check_dataset("folder", root, limit=1)
    assert summary["splits"]["train"]["checked"] == 1
    assert any("labels missing" in p for p in limited)  # existence is checked for every id


def test_folder_size_mismatch_and_lossy_labels(tmp_path):
    make_folder(tmp_path, counts={"train": 3, "val": 1})
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "labels/train/train000.png")
    noisy = np.random.default_rng(0).integers(0, 256, (16, 24)).astype(np.uint8)
    Image.fromarray(noisy).save(tmp_path / "labels/train/train001.png")
    (tmp_path / "val.txt").write_text("val000\nghost\n")
    problems, summary = check_dataset("folder", tmp_path)
    text = "\n".join(problems)
    assert "train000.png is 5x5 but image" in text
    assert "train001.png has" in text and "JPEG" in text
    assert "1 images missing" in text and "ghost" in text
    assert summary["splits"]["val"]["listed"] == 2


def test_missing_root_is_one_problem(tmp_path):
    problems, summary = check_dataset("voc", tmp_path / "absent")
    assert len(problems) == 1 and "data.root" in problems[0]
    assert summary["splits"] == {}


def test_voc_counts_rgb_masks_and_missing_sbd(tmp_path):
    make_voc(tmp_path, train=3, val=2, aug=False)
    mask = tmp_path / "SegmentationClass" / "2007_000000.png"
    Image.open(mask).convert("RGB").save(mask)
    problems, _ = check_dataset("voc", tmp_path)
    text = "\n".join(problems)
    assert "SBD 'aug' masks are missing" in text
    assert "train: 3 images listed, the published split has 10582" in text
    assert "val: 2 images listed, the published split has 1449" in text
    assert "2007_000000.png is an RGB colour image" in text


def test_cityscapes_label_ids_saved_as_train_ids(tmp_path):
    make_cityscapes(tmp_path, train_ids=True)
    gt = tmp_path / "gtFine" / "train" / "aachen"
    for path in gt.glob("*_labelIds.png"):
        target = path.with_name(path.name.replace("_labelIds", "_labelTrainIds"))
        shutil.copy(path, target)
    problems, _ = check_dataset("cityscapes", tmp_path, splits=["train"])
    assert any("holds labelIds, not trainIds" in p and "aachen" in p for p in problems)
    assert not any("bochum" in p and "labelIds" in p for p in problems)


def test_cityscapes_dominance_heuristic(tmp_path):
    make_cityscapes(tmp_path, cities={"train": ["aachen"]}, per_city=1, train_ids=True)
    path = next((tmp_path / "gtFine/train/aachen").glob("*_labelTrainIds.png"))
    # values that are valid trainIds but look like labelIds road/sidewalk/building
    label = np.random.default_rng(0).choice([7, 8, 11], size=(16, 32)).astype(np.uint8)
    Image.fromarray(label).save(path)
    problems, _ = check_dataset("cityscapes", tmp_path, splits=["train"])
    assert any("look like labelIds" in p for p in problems)


def test_camvid_layout_passes_with_counts(tmp_path):
    make_camvid(tmp_path)
    problems, summary = check_dataset("camvid", tmp_path)
    assert problems == [
        "train: 3 images listed, the published split has 367",
        "val: 2 images listed, the published split has 101",
        "test: 2 images listed, the published split has 233",
    ]
    assert summary["splits"]["train"]["ignore_share"] > 0
