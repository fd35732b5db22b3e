"""The class-wise memory bank: a plain dict of tensors, newest vectors first, FIFO per class.

bank = {"features": [C, N, D], "count": [C] long}; rows count[c]..N-1 of class c are empty (zero).
Every function here is vectorised over classes and free of host synchronisation, so it runs
unchanged on any device; the bank is saved in checkpoints as it is.
"""

from __future__ import annotations

from typing import Literal

import torch

from memseg_bench.labels import IGNORE


def new_bank(
    num_classes: int,
    size: int,
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    return {
        "features": torch.zeros(num_classes, size, dim, device=device, dtype=dtype),
        "count": torch.zeros(num_classes, device=device, dtype=torch.long),
    }


def quality_mask(
    labels: torch.Tensor,
    teacher_pred: torch.Tensor,
    teacher_conf: torch.Tensor,
    threshold: float = 0.95,
    enabled: bool = True,
) -> torch.Tensor:
    """Pixels fit for the bank: labelled, and (when enabled) predicted correctly by the teacher
    with max probability above `threshold`."""
    keep = labels != IGNORE
    if enabled:
        keep = keep & (teacher_pred == labels) & (teacher_conf > threshold)
    return keep


def k_per_class(
    n_labeled: int,
    memory_size: int,
    num_classes: int,
    batch_labeled: int,
    rule: Literal["cityscapes", "voc"] = "cityscapes",
) -> int:
    """At most K = B_l * k new vectors per class and iteration.

    cityscapes: k = max(1, round(N / n)); voc (about 3 classes per image):
    k = max(1, int(C / 3 * round(N / n)))."""
    per_image = round(memory_size / max(n_labeled, 1))
    if rule == "cityscapes":
        k = max(1, per_image)
    elif rule == "voc":
        k = max(1, int(num_classes / 3 * per_image))
    else:
        raise ValueError(f"unknown k rule {rule!r}")
    return batch_labeled * k


def random_keys(count: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform keys for a random choice: the k lowest of them are a uniform random subset."""
    if generator is None:
        return torch.rand(count, device=like.device)
    return torch.rand(count, device=generator.device, generator=generator).to(like.device)


def _group_by_class(classes, keys, descending, num_classes):
    """Row order grouped by class (sentinel C last), by key within a class (ties keep the input
    order), and the start and size of every class's run in it. bincount would synchronise with the
    host on CUDA; index_add does not."""
    by_key = torch.argsort(keys, descending=descending, stable=True)
    by_class = by_key[torch.argsort(classes[by_key], stable=True)]
    sizes = torch.zeros(num_classes + 1, dtype=torch.long, device=classes.device)
    sizes = sizes.index_add_(0, classes, torch.ones_like(classes))[:num_classes]
    return by_class, torch.cumsum(sizes, 0) - sizes, sizes


def _usable_classes(classes, num_classes, valid=None):
    """Class ids with every row that must not enter the bank set to the sentinel C."""
    usable = (classes >= 0) & (classes < num_classes)
    if valid is not None:
        usable = usable & valid.to(classes.device)
    return torch.where(usable, classes, torch.full_like(classes, num_classes))


def best_per_class(
    features: torch.Tensor,
    classes: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    num_classes: int,
    descending: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best rows of every class by key, as exactly C * k rows (class-major, best first);
    slots a class cannot fill get the class C, which `insert` skips. The fixed shape lets ranks
    all-gather their candidates without exchanging counts; `insert` of the gathered rows keeps
    what it would keep from all candidates, since the global k best of a class are among the
    per-rank k best."""
    rows = features.shape[0]
    classes = _usable_classes(classes.to(features.device), num_classes)
    if rows == 0:
        return (
            features.new_zeros((num_classes * k, features.shape[1])),
            classes.new_full((num_classes * k,), num_classes),
            keys.new_zeros((num_classes * k,)),
        )
    by_class, starts, sizes = _group_by_class(classes, keys, descending, num_classes)
    slots = torch.arange(k, device=features.device)
    picked = by_class[(starts[:, None] + slots).clamp(max=rows - 1)].flatten()
    ids = torch.arange(num_classes, device=features.device)[:, None]
    chosen = torch.where(slots < sizes[:, None], ids, torch.full_like(ids, num_classes))
    return features[picked], chosen.flatten(), keys[picked]


def pixel_order_when_few(
    classes: torch.Tensor, keys: torch.Tensor, k: int, num_classes: int, descending: bool
) -> torch.Tensor:
    """Ranking keys under which every class with at most k candidates keeps its row (pixel)
    order, ahead of any ranking; the keys of larger classes are unchanged. Keys are compared
    only within a class, so row indices can stand in for scores there."""
    keys = keys.float()
    usable = _usable_classes(classes.to(keys.device), num_classes)
    sizes = torch.zeros(num_classes + 1, dtype=torch.long, device=keys.device)
    sizes = sizes.index_add_(0, usable, torch.ones_like(usable))
    rows = torch.arange(keys.shape[0], device=keys.device, dtype=keys.dtype)
    in_order = -rows if descending else rows
    return torch.where(sizes[usable] <= k, in_order, keys)


def insert(
    bank: dict[str, torch.Tensor],
    features: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor | None,
    k: int,
    order: Literal["highest", "lowest", "random"] = "highest",
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Put at most k candidates per class in front of the bank (newest first) and return the new
    bank; older vectors shift back and those beyond N are dropped.

    features [P, D], classes [P] long, scores [P] or None. Candidates are chosen by `order`: the k
    highest or lowest scores (ties keep the input order), or a random subset when order is
    "random" or scores is None (drawn from `generator`). Rows with a class outside 0..C-1 (e.g.
    255) or with valid == False are never inserted, so callers may pass unfiltered candidates.
    """
    memory, count = bank["features"], bank["count"]
    num_classes, size, dim = memory.shape
    num_rows = features.shape[0]
    if num_rows == 0 or k <= 0:
        return {"features": memory.clone(), "count": count.clone()}
    device = memory.device
    classes = _usable_classes(classes.to(device), num_classes, valid)
    if scores is None or order == "random":
        keys, descending = random_keys(num_rows, classes, generator), False
    else:
        keys, descending = scores.detach().to(device), order == "highest"
    by_class, starts, sizes = _group_by_class(classes, keys, descending, num_classes)
    taken = sizes.clamp(max=k)  # new vectors per class [C]
    slots = torch.arange(size, device=device)
    # Slot r of class c: new candidate r if r < taken_c, else old slot r - taken_c.
    is_new = slots[None, :] < taken[:, None]
    new_rows = by_class[(starts[:, None] + slots[None, :]).clamp(max=num_rows - 1)]
    old_slot = (slots[None, :] - taken[:, None]).clamp(min=0)
    fresh = features.detach().to(device=device, dtype=memory.dtype)[new_rows]
    shifted = torch.gather(memory, 1, old_slot[:, :, None].expand(-1, -1, dim))
    new_count = (count + taken).clamp(max=size)
    filled = slots[None, :] < new_count[:, None]
    updated = torch.where(is_new[:, :, None], fresh, shifted)
    updated = torch.where(filled[:, :, None], updated, torch.zeros_like(updated))
    return {"features": updated, "count": new_count}
