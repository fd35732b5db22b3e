"""The prepare stage: make the dataset available (generate the embedded one) and verify that
every split of the sweep matches its manifest and the dataset on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from memseg_bench.config import Config
from memseg_bench.errors import UserError, problems_error
from memseg_bench.fileio import write_json

SPLITS_ROOT = Path("splits")
PREPARED = Path("data/prepared.json")
# Images checked per split (all of them for small datasets); `memseg data check` checks everything.
CHECK_LIMIT = 500


def split_dataset_name(config: Config) -> str:
    return config.split.dataset or config.data.name


def _dataset(config: Config):
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.data.synthetic import generate_synthetic

    if config.data.name == "synthetic":
        generate_synthetic(Path(config.data.root), config.data.synthetic)
    return open_dataset(config.data)


def sweep_splits(config: Config) -> dict[tuple[str, int], str]:
    """Every (split folder, label count) that a run of the sweep trains on, with the settings
    that ask for it. Ablation splits count only when the sweep holds ablations."""
    from memseg_bench.runs import RunSpec

    sweep = config.sweep
    runs = [
        (n, seed, "sweep.n_labeled x sweep.seeds") for n in sweep.n_labeled for seed in sweep.seeds
    ]
    runs += [(sweep.full_n_labeled, seed, "sweep.full_n_labeled") for seed in sweep.full_seeds]
    if sweep.ablations:
        runs += [
            (sweep.ablation_n_labeled, seed, "sweep.ablation_n_labeled")
            for seed in sweep.ablation_seeds
        ]
    selected: dict[tuple[str, int], str] = {}
    for n_labeled, seed, setting in runs:
        family = RunSpec("supervised", config.split.family, n_labeled, seed).split_family(config)
        selected.setdefault((family, n_labeled), setting)
    return selected


def prepare(config: Config, prepared_path: Path = PREPARED) -> dict:
    from memseg_bench.data.check import check_dataset
    from memseg_bench.data.splits import load_split, verify_against_dataset

    index = _dataset(config)
    problems, check = check_dataset(config.data.name, config.data.root, limit=CHECK_LIMIT)
    if problems:
        raise problems_error(problems)
    train_ids = index.ids("train")
    dataset = split_dataset_name(config)
    verified = {}
    for (family, n_labeled), setting in sweep_splits(config).items():
        selector = f"{family}/{n_labeled}"
        try:
            labeled, unlabeled = load_split(SPLITS_ROOT, dataset, family, n_labeled)
        except UserError as error:
            raise UserError(f"{error} (asked for by {setting})") from None
        where = SPLITS_ROOT / dataset / family / str(n_labeled)
        verify_against_dataset(labeled, unlabeled, train_ids, where)
        for split_id in labeled[:1] + unlabeled[:1]:
            for path in index.paths("train", split_id):
                if not Path(path).is_file():
                    raise UserError(f"{where}: image or label of {split_id!r} not found: {path}")
        verified[selector] = {"labeled": len(labeled), "unlabeled": len(unlabeled)}
    listing = hashlib.sha256()
    for split in ("train", "val", "test"):
        for item in index.ids(split) if _has_split(index, split) else []:
            listing.update(f"{split}/{item}\n".encode())
    summary = {
        "dataset": index.name,
        "root": str(config.data.root),
        "classes": list(index.class_names),
        "images": {s: len(index.ids(s)) for s in ("train", "val", "test") if _has_split(index, s)},
        "index_sha256": listing.hexdigest(),
        "check": check["splits"],
        "splits": verified,
    }
    write_json(prepared_path, summary)
    return summary


def _has_split(index, split: str) -> bool:
    try:
        return len(index.ids(split)) > 0
    except UserError:
        return False


def draw_family(config: Config, family: str, n_labeled: list[int], seed: int) -> None:
    from memseg_bench.data.splits import draw_split, write_family

    index = _dataset(config)
    train_ids = sorted(index.ids("train"))
    for n in n_labeled:
        if not 0 < n <= len(train_ids):
            raise UserError(f"--n {n} is outside 1..{len(train_ids)} (train images)")
    draws = {n: draw_split(train_ids, n, seed) for n in n_labeled}
    write_family(
        SPLITS_ROOT,
        split_dataset_name(config),
        family,
        draws,
        f"our draw (`memseg splits draw`): labeled = first n of "
        f"numpy.random.default_rng({seed}).permutation over the {len(train_ids)} sorted train "
        "ids (nested across n); unlabeled = the sorted rest",
    )
