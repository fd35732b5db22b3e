"""The class-wise memory bank: a plain dict of tensors, newest vectors first, FIFO per class.

bank = {"features": [C, N, D], "count": [C] long}; rows count[c]..N-1 of class c are empty (zero).
Every function here is vectorised over classes and free of host synchronisation, so it runs
unchanged on any device; the bank is saved in checkpoints as it is.
"""

from __future__ import annotations

from typing import Literal

import torch

IGNORE = 255


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


def _random_keys(count: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand(count, device=like.device)
    return torch.rand(count, device=generator.device, generator=generator).to(like.device)


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
    classes = classes.to(device)
    usable = (classes >= 0) & (classes < num_classes)
    if valid is not None:
        usable = usable & valid.to(device)
    # Unusable rows get the sentinel class C and sort after every real class.
    classes = torch.where(usable, classes, torch.full_like(classes, num_classes))
    if scores is None or order == "random":
        keys, descending = _random_keys(num_rows, classes, generator), False
    else:
        keys, descending = scores.detach().to(device), order == "highest"
    # Rank by score, then (stably) group by class: rows of class c are sorted by score.
    by_score = torch.argsort(keys, descending=descending, stable=True)
    by_class = by_score[torch.argsort(classes[by_score], stable=True)]
    # candidates per class (bincount would synchronise with the host on CUDA)
    sizes = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
    sizes = sizes.index_add_(0, classes, torch.ones_like(classes))[:num_classes]
    starts = torch.cumsum(sizes, 0) - sizes
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
