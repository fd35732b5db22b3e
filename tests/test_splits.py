import hashlib
import re
from pathlib import Path

import pytest

from memseg_bench.config import available_presets, config_from_dict
from memseg_bench.data.split_registry import build_registry
from memseg_bench.data.splits import (
    draw_split,
    load_split,
    read_ids,
    read_manifest,
    split_hash,
    unlabeled_subset,
    verify_against_dataset,
    write_family,
)
from memseg_bench.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "splits"
PROTOCOLS = REPO.parent / "shared" / "protocols"
CAMVID_TRAIN = REPO.parent / "shared" / "data" / "camvid_small" / "train.txt"
TRAIN_LISTS = {"voc": "train_aug.txt", "cityscapes": "train.txt", "camvid": "train.txt"}
IDS = [f"img{i:03d}" for i in range(30)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- functions ---------------------------------------------------------------------------------


def test_draw_split_is_seeded_nested_and_complete():
    labeled, unlabeled = draw_split(list(reversed(IDS)), 5, seed=0)
    assert draw_split(IDS, 5, seed=0) == (labeled, unlabeled)  # input order does not matter
    assert draw_split(IDS, 5, seed=1)[0] != labeled
    assert unlabeled == sorted(unlabeled) and not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == IDS
    assert draw_split(IDS, 10, seed=0)[0][:5] == labeled
    with pytest.raises(UserError, match="outside"):
        draw_split(IDS, 31, seed=0)


def test_unlabeled_subset_is_seeded_nested_and_bounded():
    unlabeled = draw_split(IDS, 6, seed=0)[1]
    subset = unlabeled_subset(list(reversed(unlabeled)), 8, seed=2)
    assert len(subset) == 8 and subset == sorted(subset) and set(subset) <= set(unlabeled)
    assert unlabeled_subset(unlabeled, 8, seed=2) == subset
    assert unlabeled_subset(unlabeled, 8, seed=3) != subset
    assert set(subset) <= set(unlabeled_subset(unlabeled, 12, seed=2))
    assert unlabeled_subset(unlabeled, 24, seed=2) == sorted(unlabeled)
    with pytest.raises(UserError, match="split.n_unlabeled.*24 unlabeled"):
        unlabeled_subset(unlabeled, 25, seed=2)


def test_write_load_and_tamper(tmp_path):
    draws = {n: draw_split(IDS, n, 7) for n in (4, 12)}
    write_family(tmp_path, "toy", "random", draws, "drawn with seed 7")
    labeled, unlabeled = load_split(tmp_path, "toy", "random", 4)
    assert (labeled, unlabeled) == draws[4]
    text = (tmp_path / "toy/random/4/labeled.txt").read_bytes()
    assert text.endswith(b"\n") and b"\r" not in text and text.count(b"\n") == 4
    manifest = read_manifest(tmp_path / "toy")
    assert set(manifest) == {
        f"random/{n}/{f}.txt" for n in (4, 12) for f in ("labeled", "unlabeled")
    }
    assert "- `random`: drawn with seed 7" in (tmp_path / "toy/PROVENANCE.md").read_text()
    assert split_hash(*draws[4]) != split_hash(*draws[12])

    write_family(tmp_path, "toy", "other", {3: draw_split(IDS, 3, 1)}, "seed 1")
    assert len(read_manifest(tmp_path / "toy")) == 6  # the first family's entries are kept
    before = (tmp_path / "toy/random/4/labeled.txt").read_bytes()
    # adding a count keeps the others; drawing an existing count again with the same ids is a
    # no-op, with other ids it is refused and nothing changes
    write_family(tmp_path, "toy", "random", {4: draws[4], 5: draw_split(IDS, 5, 7)}, "seed 7.")
    assert (tmp_path / "toy/random/4/labeled.txt").read_bytes() == before
    assert (tmp_path / "toy/random/12/labeled.txt").is_file()
    assert len(read_manifest(tmp_path / "toy")) == 8
    manifest = (tmp_path / "toy/MANIFEST.sha256").read_bytes()
    with pytest.raises(UserError, match=r"toy/random/4 already holds a different draw"):
        write_family(tmp_path, "toy", "random", {4: draw_split(IDS, 4, 8)}, "seed 8")
    assert (tmp_path / "toy/random/4/labeled.txt").read_bytes() == before
    assert (tmp_path / "toy/MANIFEST.sha256").read_bytes() == manifest
    provenance = (tmp_path / "toy/PROVENANCE.md").read_text()
    assert "seed 7." in provenance and "seed 8" not in provenance and "seed 1" in provenance

    path = tmp_path / "toy/random/5/labeled.txt"
    path.write_text(path.read_text().replace("img", "imG", 1))
    with pytest.raises(UserError, match=r"random/5/labeled\.txt does not match MANIFEST\.sha256"):
        load_split(tmp_path, "toy", "random", 5)
    with pytest.raises(
        UserError, match=r"random/99 not found.*available: other/3, random/12, random/4, random/5"
    ):
        load_split(tmp_path, "toy", "random", 99)


def test_verify_against_dataset():
    labeled, unlabeled = draw_split(IDS, 6, 0)
    verify_against_dataset(labeled, unlabeled, IDS, "splits/toy/random/6")
    with pytest.raises(UserError, match=r"random/6/labeled\.txt: id 'ghost'"):
        verify_against_dataset(labeled + ["ghost"], unlabeled, IDS, "splits/toy/random/6")
    with pytest.raises(UserError, match="both labeled and unlabeled"):
        verify_against_dataset(labeled, unlabeled + labeled[:1], IDS, "splits/toy/random/6")
    with pytest.raises(UserError, match="in neither list"):
        verify_against_dataset(labeled, unlabeled[1:], IDS, "splits/toy/random/6")


# -- the shipped registry ----------------------------------------------------------------------


def registry_pairs():
    for dataset in ("voc", "cityscapes", "camvid"):
        for labeled in sorted((SPLITS / dataset).glob("*/*/labeled.txt")):
            yield dataset, labeled.parent


def test_registry_pairs_are_complete_and_verified():
    pairs = list(registry_pairs())
    families = {(d, folder.parent.name) for d, folder in pairs}
    assert {("voc", f) for f in ("alonso_0", "alonso_1", "alonso_2", "classmix_0")} <= families
    assert {("voc", f) for f in ("classic", "blended_cps", "blended_u2pl")} <= families
    assert {
        ("cityscapes", f) for f in ("cps", "u2pl", "unimatch", "ours_s0", "ours_s2")
    } <= families
    assert {("camvid", f"random_s{k}") for k in range(3)} <= families
    for dataset, folder in pairs:
        train = read_ids(SPLITS / dataset / TRAIN_LISTS[dataset])
        labeled, unlabeled = load_split(SPLITS, dataset, folder.parent.name, int(folder.name))
        assert len(labeled) == int(folder.name)
        assert unlabeled == sorted(unlabeled)
        verify_against_dataset(labeled, unlabeled, train, folder)
    checked = (("voc", "alonso_1"), ("cityscapes", "ours_s1"), ("camvid", "random_s2"))
    sizes = {
        d: sorted(int(f.name) for dd, f in pairs if dd == d and f.parent.name == fam)
        for d, fam in checked
    }
    assert sizes == {
        "voc": [212, 530, 1323],
        "cityscapes": [100, 372, 744],
        "camvid": [23, 46, 92, 367],
    }


def test_every_registry_file_is_in_its_manifest():
    for dataset in ("voc", "cityscapes", "camvid"):
        manifest = read_manifest(SPLITS / dataset)
        files = {
            p.relative_to(SPLITS / dataset).as_posix() for p in (SPLITS / dataset).rglob("*.txt")
        }
        assert files == set(manifest)
        for name, digest in manifest.items():
            assert sha(SPLITS / dataset / name) == digest, name
        assert (SPLITS / dataset / "PROVENANCE.md").is_file()


@pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="../shared/protocols is absent")
def test_registry_matches_the_protocol_manifest():
    protocol = {}
    for line in (PROTOCOLS / "MANIFEST.sha256").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        protocol[name] = digest
    compared = 0
    for name, digest in protocol.items():
        ours = SPLITS / name
        if ours.is_file():
            assert sha(ours) == digest, name
            compared += 1
    assert compared >= 27  # train/val lists and every copied labeled.txt
    # Alonso/ClassMix labeled sets are the first n lines of the published permutations.
    order = read_ids(PROTOCOLS / "voc/alonso/split_1.txt")
    assert read_ids(SPLITS / "voc/alonso_1/530/labeled.txt") == order[:530]
    # The full-label entry of alonso_0 is the whole published permutation.
    assert sha(SPLITS / "voc/alonso_0/10582/labeled.txt") == protocol["voc/alonso/split_0.txt"]
    # Rebuilt unlabeled lists match the "rebuilt sha256" column of the protocols README.
    readme = (PROTOCOLS / "README.md").read_text()
    rows = re.findall(r"^\| `([\w/]+/unlabeled\.txt)` \| \d+ \| `([0-9a-f]{64})`", readme, re.M)
    assert len(rows) == 22  # classic 5 + blended 8 (VOC), cps 4 + u2pl 4 + unimatch 1
    for name, digest in rows:
        assert sha(SPLITS / name) == digest, name


@pytest.mark.skipif(
    not (PROTOCOLS.is_dir() and CAMVID_TRAIN.is_file()), reason="../shared inputs are absent"
)
def test_build_registry_reproduces_the_committed_files(tmp_path):
    build_registry(PROTOCOLS, CAMVID_TRAIN, tmp_path)
    build_registry(PROTOCOLS, CAMVID_TRAIN, tmp_path)  # idempotent
    built = {p.relative_to(tmp_path).as_posix(): sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(SPLITS).as_posix(): sha(p) for p in SPLITS.rglob("*") if p.is_file()}
    committed = {k: v for k, v in committed.items() if not k.startswith("synthetic/")}
    assert built == committed


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads_and_names_shipped_splits(preset):
    config = config_from_dict({"preset": preset})
    assert config.preset == preset
    if config.data.name == "synthetic":
        return  # the pipeline draws splits/synthetic itself
    dataset = config.split.dataset
    assert dataset in ("voc", "cityscapes", "camvid")
    for seed in (0, 1, 2):
        family = config.split.family + (config.split.seed_suffix or "").format(seed=seed)
        for n in config.split.n_labeled:
            load_split(SPLITS, dataset, family, n)
    full = len(read_ids(SPLITS / dataset / TRAIN_LISTS[dataset]))
    family0 = config.split.family + (config.split.seed_suffix or "").format(seed=0)
    labeled, unlabeled = load_split(SPLITS, dataset, family0, full)
    assert len(labeled) == full and unlabeled == []
    if dataset != "camvid":  # the reference normalisation: (x - mean) / 255
        assert config.data.std == (255.0, 255.0, 255.0)
        assert config.train.iterations == 150000
        assert config.evaluate.mode == "whole"


def test_semi_supervised_runs_draw_only_from_the_unlabeled_subset(tmp_path, monkeypatch):
    import copy

    from memseg_bench.config import load_config
    from memseg_bench.distributed import Dist
    from memseg_bench.engine import open_train_data
    from memseg_bench.runs import RunSpec
    from tests.project import TINY_PARAMS, make_project, memseg

    params = copy.deepcopy(TINY_PARAMS)
    params["split"]["n_unlabeled"] = 5
    project = make_project(tmp_path / "p", params)
    memseg(project, "prepare")
    monkeypatch.chdir(project)
    config = load_config("params.yaml")
    spec = RunSpec("memseg", "random", 6, 0)
    _, unlabeled = load_split(Path("splits"), "synthetic", "random", 6)
    pooled = open_train_data(config, spec, Dist(), needs_unlabeled=True)
    whole = open_train_data(
        load_config("params.yaml", {"split": {"n_unlabeled": None}}), spec, Dist(), True
    )
    assert pooled.n_unlabeled == 5 and whole.n_unlabeled == len(unlabeled) == 18
    assert pooled.split_hash == whole.split_hash  # the same split draw
    seen = {name for _ in range(12) for name in next(pooled.unlabeled)["id"]}
    assert seen == set(unlabeled_subset(unlabeled, 5, seed=0))
