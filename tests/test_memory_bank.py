"""Memory bank: FIFO order, the quality filter, ranked insertion, per-rank preselection, the k rule,
state round trip."""

import pytest
import torch

from memseg_bench.methods.memory_bank import (
    best_per_class,
    insert,
    k_per_class,
    new_bank,
    quality_mask,
)


def tagged(values, classes, dim=3):
    """Rows whose every entry is the row's tag, so bank contents can be read back as tags."""
    values = torch.as_tensor(values, dtype=torch.float32)
    return values[:, None].expand(-1, dim).clone(), torch.as_tensor(classes)


def tags(bank, c):
    n = int(bank["count"][c])
    return bank["features"][c, :n, 0].tolist()


def test_fifo_newest_first_and_oldest_dropped():
    bank = new_bank(2, 5, 3, "cpu")
    simulated = {0: [], 1: []}
    tag = 0
    for step in range(6):
        rows, classes = [], []
        for c in (0, 1):
            for _ in range(2 if c == 0 else step % 3):  # class 1 gets 0, 1 or 2 per step
                tag += 1
                rows.append(float(tag))
                classes.append(c)
        feats, cls = tagged(rows, classes)
        # scores decrease with the tag: "highest" keeps the input order within a class
        bank = insert(bank, feats, cls, -feats[:, 0], k=2, order="highest")
        for c in (0, 1):
            batch = [t for t, k in zip(rows, classes, strict=True) if k == c]
            simulated[c] = (batch + simulated[c])[:5]
            assert tags(bank, c) == simulated[c]
    assert bank["count"].tolist() == [5, 5]
    # empty slots stay zero
    partial = insert(new_bank(1, 4, 3, "cpu"), *tagged([7.0], [0]), None, k=2, order="random")
    assert partial["count"].tolist() == [1]
    assert partial["features"][0, 1:].abs().sum() == 0


def test_ranking_keeps_highest_or_lowest_and_at_most_k():
    feats, classes = tagged([1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 1, 2])
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.2, 0.8, 0.4])
    high = insert(new_bank(3, 4, 3, "cpu"), feats, classes, scores, k=2, order="highest")
    low = insert(new_bank(3, 4, 3, "cpu"), feats, classes, scores, k=2, order="lowest")
    assert tags(high, 0) == [2.0, 4.0]
    assert tags(high, 1) == [6.0, 5.0]
    assert tags(high, 2) == [7.0]
    assert tags(low, 0) == [3.0, 1.0]
    assert tags(low, 1) == [5.0, 6.0]
    assert high["count"].tolist() == [2, 2, 1]


def test_random_order_subset_and_deterministic():
    feats, classes = tagged(list(range(1, 21)), [0] * 20)
    picks = []
    for seed in (0, 0, 1):
        gen = torch.Generator().manual_seed(seed)
        bank = insert(new_bank(1, 8, 3, "cpu"), feats, classes, None, k=5, generator=gen)
        picks.append(tags(bank, 0))
    assert picks[0] == picks[1]
    assert picks[0] != picks[2]
    assert len(set(picks[0])) == 5 and set(picks[0]) <= set(range(1, 21))


def test_ignored_and_masked_rows_never_enter():
    feats, classes = tagged([1, 2, 3, 4], [0, 255, 1, 0])
    valid = torch.tensor([True, True, True, False])
    bank = insert(new_bank(2, 4, 3, "cpu"), feats, classes, None, k=4, valid=valid)
    assert tags(bank, 0) == [1.0]
    assert tags(bank, 1) == [3.0]


@pytest.mark.parametrize("order", ["highest", "lowest"])
def test_best_per_class_of_each_rank_then_insert_equals_insert_of_all(order):
    gen = torch.Generator().manual_seed(3)
    rows = 40
    features = torch.randn(rows, 3, generator=gen)
    classes = torch.randint(0, 5, (rows,), generator=gen)  # 4 (and 255) are not bank classes
    classes[::7] = 255
    keys = torch.randint(0, 6, (rows,), generator=gen).float()  # many ties
    k = 3
    start = new_bank(4, 6, 3)
    start = insert(start, *tagged(range(100, 108), [0, 1, 2, 3] * 2), None, 4)
    expected = insert(start, features, classes, keys, k, order)
    descending = order == "highest"
    halves = [
        best_per_class(f, c, s, k, 4, descending)
        for f, c, s in zip(features.chunk(2), classes.chunk(2), keys.chunk(2), strict=True)
    ]
    assert all(half[0].shape == (4 * k, 3) for half in halves)  # fixed shape for all_gather
    gathered = [torch.cat(parts) for parts in zip(*halves, strict=True)]
    got = insert(start, *gathered, k, order)
    torch.testing.assert_close(got["features"], expected["features"])
    assert torch.equal(got["count"], expected["count"])


def test_best_per_class_marks_unfilled_slots():
    features, classes = tagged([1, 2, 3], [2, 2, 0])
    rows, chosen, keys = best_per_class(
        features, classes, torch.tensor([0.1, 0.9, 0.5]), 2, 3, True
    )
    assert chosen.tolist() == [0, 3, 3, 3, 2, 2]  # class 0: one row, class 1: none
    assert rows[:, 0].tolist()[0] == 3 and rows[4:, 0].tolist() == [2, 1]
    assert keys[4:].tolist() == pytest.approx([0.9, 0.1])


def test_quality_filter_keeps_correct_confident_pixels():
    labels = torch.tensor([0, 1, 2, 255, 1, 2])
    pred = torch.tensor([0, 1, 0, 255, 1, 2])
    conf = torch.tensor([0.99, 0.90, 0.99, 0.99, 0.96, 0.951])
    assert quality_mask(labels, pred, conf, 0.95).tolist() == [
        True,
        False,
        False,
        False,
        True,
        True,
    ]
    assert quality_mask(labels, pred, conf, 0.95, enabled=False).tolist() == [
        True,
        True,
        True,
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    "n, expected", [(212, 20 * 7), (530, 20 * 1), (1323, 20 * 1), (100, 20 * 21)]
)
def test_k_voc_rule(n, expected):
    # round(256/212) = 1 -> int(21/3 * 1) = 7; round(256/530) = 0 -> max(1, 0) = 1;
    # round(256/100) = 3 -> int(7 * 3) = 21
    assert k_per_class(n, 256, 21, 20, "voc") == expected


@pytest.mark.parametrize("n, expected", [(100, 7 * 3), (372, 7 * 1), (744, 7 * 1), (50, 7 * 5)])
def test_k_cityscapes_rule(n, expected):
    assert k_per_class(n, 256, 19, 7, "cityscapes") == expected


def test_k_voc_rule_non_integer_class_share():
    # C / 3 = 19 / 3: int(6.33 * 3) = 19 per image
    assert k_per_class(100, 256, 19, 2, "voc") == 2 * 19


def test_state_dict_round_trip(tmp_path):
    feats = torch.randn(9, 4)
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    bank = insert(new_bank(3, 5, 4, "cpu"), feats, classes, torch.rand(9), k=2)
    torch.save(bank, tmp_path / "bank.pt")
    loaded = torch.load(tmp_path / "bank.pt", weights_only=True)
    assert set(loaded) == {"features", "count"}
    for key in bank:
        assert torch.equal(loaded[key], bank[key])
    assert loaded["count"].dtype == torch.long
    again = insert(loaded, feats, classes, None, k=1)
    assert again["count"].tolist() == [3, 3, 3]


def test_dtype_and_no_gradient_kept():
    bank = new_bank(2, 3, 4, "cpu", torch.float64)
    feats = torch.randn(4, 4, requires_grad=True)
    out = insert(bank, feats, torch.tensor([0, 0, 1, 1]), None, k=3)
    assert out["features"].dtype == torch.float64
    assert not out["features"].requires_grad
    assert bank["count"].tolist() == [0, 0]  # the input bank is untouched


@pytest.mark.gpu
def test_cuda_matches_cpu():
    feats = torch.randn(50, 4)
    classes = torch.randint(0, 3, (50,))
    scores = torch.rand(50)
    cpu = insert(new_bank(3, 8, 4, "cpu"), feats, classes, scores, k=4)
    gpu = insert(new_bank(3, 8, 4, "cuda"), feats.cuda(), classes.cuda(), scores.cuda(), k=4)
    assert torch.equal(gpu["features"].cpu(), cpu["features"])
    assert torch.equal(gpu["count"].cpu(), cpu["count"])


@pytest.mark.gpu
def test_insert_has_no_host_sync_on_cuda():
    feats = torch.randn(300, 8, device="cuda")
    classes = torch.randint(0, 6, (300,), device="cuda")
    classes[::7] = 255
    scores = torch.rand(300, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bank = new_bank(5, 16, 8, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = quality_mask(classes, classes, scores, 0.5)
        for order in ("highest", "lowest", "random"):
            bank = insert(bank, feats, classes, scores, 4, order, generator=gen, valid=keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bank["count"].tolist() == [12] * 5
