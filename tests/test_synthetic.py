import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from memseg_bench.config import SyntheticConfig
from memseg_bench.data.synthetic import CLASS_NAMES, generate_synthetic, render_sample
from memseg_bench.errors import UserError

SMALL = SyntheticConfig(seed=3, n_train=12, n_val=3, n_test=2, size=48)


def tree_hash(root) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_config_gives_the_same_bytes(tmp_path):
    generate_synthetic(tmp_path / "a", SMALL)
    generate_synthetic(tmp_path / "b", SMALL)
    generate_synthetic(tmp_path / "c", dataclasses.replace(SMALL, seed=4))
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a") != tree_hash(tmp_path / "c")


def test_layout_and_contents(tmp_path):
    root = tmp_path / "syn"
    generate_synthetic(root, SMALL)
    classes = json.loads((root / "classes.json").read_text())
    assert classes["classes"] == list(CLASS_NAMES)
    assert classes["num_classes"] == len(CLASS_NAMES) >= 6
    assert classes["ignore_index"] == 255 and len(classes["palette"]) == len(CLASS_NAMES)
    for split, n in (("train", 12), ("val", 3), ("test", 2)):
        ids = (root / f"{split}.txt").read_text().splitlines()
        assert len(ids) == n == len(set(ids))
        for item in ids:
            image = Image.open(root / "images" / split / f"{item}.png")
            label = Image.open(root / "labels" / split / f"{item}.png")
            assert image.mode == "RGB" and label.mode == "L"
            assert image.size == label.size == (48, 48)
            values = set(np.unique(np.asarray(label)).tolist())
            assert values <= set(range(len(CLASS_NAMES))) | {255}
    # no leftover temporary folder beside the root
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]


def test_existing_root_with_same_config_is_kept_and_other_config_refused(tmp_path):
    root = tmp_path / "syn"
    generate_synthetic(root, SMALL)
    marker = root / "images" / "train" / "train_00000.png"
    before = marker.stat().st_mtime_ns
    generate_synthetic(root, SMALL)
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(UserError, match="delete"):
        generate_synthetic(root, dataclasses.replace(SMALL, n_train=13))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(UserError, match="stamp"):
        generate_synthetic(other, SMALL)


def _statistics(n: int = 150, size: int = 64):
    present = np.zeros(len(CLASS_NAMES), int)
    ignore_share, per_image_classes = [], []
    colour_by_class = {k: [] for k in range(1, len(CLASS_NAMES))}
    for i in range(n):
        image, label = render_sample(np.random.default_rng([0, 0, i]), size)
        values = np.unique(label)
        present[values[values < 255]] += 1
        per_image_classes.append(int((values[(values > 0) & (values < 255)]).size))
        ignore_share.append(float((label == 255).mean()))
        for k in colour_by_class:
            if (label == k).sum() > 20:
                colour_by_class[k].append(image[label == k].mean(0))
    return present, np.array(ignore_share), per_image_classes, colour_by_class


def test_classes_occur_with_clutter_occlusion_and_ignore_bands():
    present, ignore_share, per_image, colours = _statistics()
    assert (present[1:] > 30).all(), present  # every class is common
    assert np.mean(per_image) >= 2.0  # several objects per image
    assert 0.2 < (ignore_share > 0).mean() < 1.0  # bands on some objects only
    assert ignore_share.max() < 0.2
    # Colour is a class tendency, not the class: the nearest class-mean colour names the class
    # of an object far better than chance (1/6) but wrongly for a large share of them.
    means = {k: np.mean(colours[k], 0) for k in colours}
    hits = [
        min(means, key=lambda j: np.linalg.norm(colour - means[j])) == k
        for k in colours
        for colour in colours[k]
    ]
    assert 0.3 < np.mean(hits) < 0.8


def test_bad_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.synthetic.size"):
        generate_synthetic(tmp_path / "x", dataclasses.replace(SMALL, size=8))
    with pytest.raises(UserError, match="n_val"):
        generate_synthetic(tmp_path / "x", dataclasses.replace(SMALL, n_val=-1))
