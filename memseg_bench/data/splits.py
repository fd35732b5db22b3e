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


def unlabeled_subset(unlabeled: Sequence[str], n: int, seed: int) -> list[str]:
    """n of the unlabeled ids, drawn as `draw_split` draws labeled ones, returned sorted; the
    same seed gives nested subsets for growing n."""
    if n > len(unlabeled):
        held = len(unlabeled)
        raise UserError(
            f"params: 'split.n_unlabeled' is {n}, but the split has {held} unlabeled images"
        )
    return sorted(draw_split(unlabeled, n, seed)[0])


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
