import json

import numpy as np
import pytest
import torch
from PIL import Image

from memseg_bench.config import DataConfig
from memseg_bench.data.datasets import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    VOC_PALETTE,
    load_sample,
    open_dataset,
)
from memseg_bench.data.loader import BatchStream, SegmentationDataset, epoch_plan
from memseg_bench.errors import UserError
from tests.fakes import make_camvid, make_cityscapes, make_folder, make_voc


def opened(name, root):
    return open_dataset(DataConfig(name=name, root=str(root)))


def assert_samples(index, samples, exact_image=True):
    for (split, item), (image, label) in samples.items():
        got_image, got_label = load_sample(index, split, item)
        assert got_label.dtype == np.uint8 and got_image.dtype == np.uint8
        np.testing.assert_array_equal(got_label, label)
        if exact_image:
            np.testing.assert_array_equal(got_image, image)
        else:
            assert got_image.shape == image.shape


# -- readers -----------------------------------------------------------------------------------


def test_folder_layout_with_lists_and_jpeg_images(tmp_path):
    samples = make_folder(tmp_path, image_ext=".jpg")
    index = opened("folder", tmp_path)
    assert index.class_names == ("class0", "class1", "class2", "class3")
    assert index.splits() == ["train", "val", "test"]
    assert index.ids("train") == [f"train{i:03d}" for i in range(6)]
    image_path, label_path = index.paths("val", "val001")
    assert image_path.suffix == ".jpg" and label_path == tmp_path / "labels/val/val001.png"
    assert_samples(index, samples)


def test_folder_layout_without_lists_uses_sorted_stems(tmp_path):
    make_folder(tmp_path, counts={"train": 3}, lists=False)
    (tmp_path / "images/train/train002.png").rename(tmp_path / "images/train/a.png")
    (tmp_path / "labels/train/train002.png").rename(tmp_path / "labels/train/a.png")
    assert opened("folder", tmp_path).ids("train") == ["a", "train000", "train001"]


def test_voc_with_aug_masks(tmp_path):
    samples = make_voc(tmp_path, train=4, val=2)
    index = opened("voc", tmp_path)
    assert index.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21
    assert VOC_PALETTE[1] == (128, 0, 0) and VOC_PALETTE[15] == (192, 128, 128)
    assert index.ids("train") == [f"2007_{i:06d}" for i in range(4)]
    assert index.ids("val") == ["2008_000000", "2008_000001"]
    assert_samples(index, samples, exact_image=False)


def test_voc_palette_masks_are_read_as_indices_not_colours(tmp_path):
    samples = make_voc(tmp_path, train=2, val=1, aug=False)
    assert Image.open(next((tmp_path / "SegmentationClass").iterdir())).mode == "P"
    index = opened("voc", tmp_path)
    assert_samples(index, samples, exact_image=False)


def test_voc_root_may_be_the_devkit_folder(tmp_path):
    make_voc(tmp_path / "VOCdevkit" / "VOC2012", train=2, val=1)
    index = opened("voc", tmp_path)
    assert len(index.ids("train")) == 2


def test_cityscapes_label_ids_are_converted(tmp_path):
    samples = make_cityscapes(tmp_path)
    index = opened("cityscapes", tmp_path)
    assert index.class_names == CITYSCAPES_CLASSES and len(index.palette) == 19
    assert index.ids("train")[:2] == ["aachen/aachen_000000_000000", "aachen/aachen_000000_000001"]
    assert len(index.ids("train")) == 4 and index.splits() == ["train", "val"]
    assert index.paths("val", "frankfurt/frankfurt_000000_000001")[1].name.endswith("labelIds.png")
    assert_samples(index, samples)
    _, label = load_sample(index, "train", "aachen/aachen_000000_000000")
    assert label.max() == 255 and label[label != 255].max() <= 18


def test_cityscapes_prefers_train_ids(tmp_path):
    samples = make_cityscapes(tmp_path, train_ids=True)
    index = opened("cityscapes", tmp_path)
    assert index.paths("train", "bochum/bochum_000000_000000")[1].name.endswith("TrainIds.png")
    assert_samples(index, samples)


def test_camvid_void_becomes_ignore(tmp_path):
    samples = make_camvid(tmp_path)
    index = opened("camvid", tmp_path)
    assert len(index.class_names) == 11 and index.splits() == ["train", "val", "test"]
    assert_samples(index, samples)
    assert any((label == 255).any() for _, label in samples.values())


# -- errors ------------------------------------------------------------------------------------


def test_missing_root_and_folders_name_the_path(tmp_path):
    with pytest.raises(UserError, match=r"data\.root.*nowhere"):
        opened("folder", tmp_path / "nowhere")
    (tmp_path / "city").mkdir()
    with pytest.raises(UserError, match=r"data\.root.*leftImg8bit"):
        opened("cityscapes", tmp_path / "city")
    make_folder(tmp_path / "f", counts={"train": 1})
    with pytest.raises(UserError, match=r"labels/val"):
        (tmp_path / "f" / "images" / "val").mkdir()
        opened("folder", tmp_path / "f").ids("val")


def test_bad_samples_name_the_file(tmp_path):
    make_folder(tmp_path, counts={"train": 4})
    index = opened("folder", tmp_path)
    (tmp_path / "images/train/train000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="train000.png"):
        load_sample(index, "train", "train000")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "labels/train/train001.png")
    with pytest.raises(UserError, match=r"train001\.png is 5x5 but image"):
        load_sample(index, "train", "train001")
    bad = np.zeros((16, 24), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(tmp_path / "labels/train/train002.png")
    with pytest.raises(UserError, match=r"train002\.png has value 7"):
        load_sample(index, "train", "train002")
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "labels/train/train003.png")
    with pytest.raises(UserError, match=r"train003\.png has mode RGB"):
        load_sample(index, "train", "train003")
    with pytest.raises(UserError, match="nope"):
        index.paths("train", "nope")


def test_bad_classes_json(tmp_path):
    make_folder(tmp_path, counts={"train": 1})
    (tmp_path / "classes.json").write_text(
        json.dumps({"classes": ["a", "b"], "palette": [[0, 0, 0]]})
    )
    with pytest.raises(UserError, match="classes.json"):
        opened("folder", tmp_path)


# -- torch datasets and streams ----------------------------------------------------------------


def make_coupled(root, sizes):
    """Images whose red channel encodes the label, so crops can be checked for alignment."""
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        label = rng.integers(0, 4, (height, width)).astype(np.uint8)
        image = np.stack([label * 40 + 10, label, np.full_like(label, 7)], -1)
        for folder, array in (("images", image), ("labels", label)):
            (root / folder / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / "train" / f"img{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": list("abcd")}))
    return opened("folder", root)


def test_training_crops_are_aligned_and_padded(tmp_path):
    index = make_coupled(tmp_path, [(20, 30), (8, 12)])
    dataset = SegmentationDataset(index, "train", index.ids("train"), crop=16, train=True, seed=1)
    for key in [0, 1, (0, 3, 5), (1, 2, 9)]:
        item = dataset[key]
        image, label = item["image"], item["label"]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert label.shape == (16, 16) and label.dtype == torch.int64
        valid = label != 255
        assert torch.equal(image[0][valid], (label[valid] * 40 + 10).float())
        assert (image[:, ~valid] == 0).all()
    small = dataset[1]
    assert (small["label"] == 255).sum() == 16 * 16 - 8 * 12
    crops = {tuple(dataset[(0, epoch, 0)]["label"].flatten()[:40].tolist()) for epoch in range(6)}
    assert len(crops) > 1  # the window moves with the epoch
    assert torch.equal(dataset[(0, 2, 4)]["image"], dataset[(0, 2, 4)]["image"])


def test_eval_items_and_input_scale(tmp_path):
    index = make_coupled(tmp_path, [(20, 30)])
    whole = SegmentationDataset(index, "train", ["img0"], crop=None, train=False, seed=0)
    assert whole[0]["image"].shape == (3, 20, 30) and whole[0]["id"] == "img0"
    half = SegmentationDataset(index, "train", ["img0"], None, False, 0, input_scale=0.5)
    assert half[0]["image"].shape == (3, 10, 15) and half[0]["label"].shape == (20, 30)
    train_half = SegmentationDataset(index, "train", ["img0"], 8, True, 0, input_scale=0.5)
    item = train_half[0]
    assert item["image"].shape == (3, 8, 8) and item["label"].shape == (8, 8)


def test_epoch_plan_permutes_and_shards():
    plan = epoch_plan(10, 3, seed=5, epoch=0, rank=0, world_size=1, drop_last=False)
    assert sorted(key[0] for batch in plan for key in batch) == list(range(10))
    assert [len(b) for b in plan] == [3, 3, 3, 1]
    other = epoch_plan(10, 3, seed=5, epoch=1, rank=0, world_size=1, drop_last=False)
    assert plan != other
    shards = [epoch_plan(12, 2, 5, 0, rank, 3, drop_last=True) for rank in range(3)]
    seen = [key[0] for shard in shards for batch in shard for key in batch]
    assert sorted(seen) == list(range(12))
    positions = [key[2] for shard in shards for batch in shard for key in batch]
    assert len(set(positions)) == 12
    tiny = epoch_plan(2, 4, 5, 0, 0, 1, drop_last=True)
    assert len(tiny) == 1 and len(tiny[0]) == 4  # a set smaller than a batch is tiled


@pytest.fixture
def train_dataset(tmp_path):
    make_folder(tmp_path, counts={"train": 7}, size=(12, 14))
    index = opened("folder", tmp_path)
    return SegmentationDataset(index, "train", index.ids("train"), crop=8, train=True, seed=3)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_is_deterministic_and_resumable(train_dataset):
    first = take(BatchStream(train_dataset, 2, seed=11), 9)  # 3 batches an epoch
    assert all(b["image"].shape == (2, 3, 8, 8) for b in first)
    again = take(BatchStream(train_dataset, 2, seed=11), 9)
    for a, b in zip(first, again, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
    other = take(BatchStream(train_dataset, 2, seed=12), 9)
    assert [b["id"] for b in other] != [b["id"] for b in first]

    stream = BatchStream(train_dataset, 2, seed=11)
    take(stream, 4)
    state = stream.state()
    assert state == {"epoch": 1, "position": 1}
    resumed = take(BatchStream(train_dataset, 2, seed=11, start_state=state), 5)
    for a, b in zip(first[4:], resumed, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["label"], b["label"])
    stream.load_state({"epoch": 0, "position": 2})
    assert next(stream)["id"] == first[2]["id"]


def test_stream_does_not_depend_on_workers(train_dataset):
    serial = take(BatchStream(train_dataset, 2, seed=4), 4)
    parallel = take(BatchStream(train_dataset, 2, seed=4, workers=2), 4)
    for a, b in zip(serial, parallel, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["image"], b["image"])


def test_stream_ranks_split_each_epoch(train_dataset):
    ranks = [BatchStream(train_dataset, 1, seed=2, rank=r, world_size=2) for r in range(2)]
    seen = [b["id"][0] for stream in ranks for b in take(stream, 4)]  # 8 = 7 + 1 wrapped
    assert set(seen) == set(train_dataset.ids)
