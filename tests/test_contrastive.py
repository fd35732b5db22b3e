"""The closed-form contrastive loss against a naive double loop written here, in float64."""

import mmap

import pytest
import torch

from memseg_bench.methods.contrastive import contrastive_loss
from memseg_bench.methods.contrastive_pairwise import contrastive_loss_pairwise

C, N, D = 5, 6, 8


def naive(features, classes, memory, count, f_scores, m_scores, num_classes):
    """Sum over classes of the mean over all (f, m) pairs of w_f w_m (1 - cos), divided by C."""
    total = features.sum() * 0.0
    for c in range(num_classes):
        rows = [p for p in range(features.shape[0]) if int(classes[p]) == c]
        size = int(count[c])
        if len(rows) < 2 or size < 2:
            continue
        s_f = [
            f_scores[p] if f_scores is not None else torch.ones((), dtype=features.dtype)
            for p in rows
        ]
        s_m = [
            m_scores[c, j] if m_scores is not None else torch.ones((), dtype=features.dtype)
            for j in range(size)
        ]
        sum_f, sum_m = sum(s_f), sum(s_m)
        class_total = 0.0
        for a, p in enumerate(rows):
            f = features[p]
            w_f = len(rows) * s_f[a] / sum_f
            for j in range(size):
                m = memory[c, j].detach()
                w_m = size * s_m[j] / sum_m
                cos = (f @ m) / (f.norm() * m.norm())
                class_total = class_total + w_f * w_m * (1.0 - cos)
        total = total + class_total / (len(rows) * size)
    return total / num_classes


def make_inputs(seed: int, with_memory_scores: bool):
    gen = torch.Generator().manual_seed(seed)
    # class 3 absent, class 4 a single pixel, some ignored (255) pixels
    classes = torch.cat(
        [
            torch.randint(0, 3, (40,), generator=gen),
            torch.tensor([4, 255, 255]),
        ]
    )
    classes = classes[torch.randperm(classes.shape[0], generator=gen)]
    p = classes.shape[0]
    features = torch.randn(p, D, generator=gen, dtype=torch.float64).requires_grad_()
    memory = torch.randn(C, N, D, generator=gen, dtype=torch.float64)
    count = torch.tensor([6, 3, 1, 6, 4])  # partially filled; class 2 has one vector
    memory = memory * (torch.arange(N)[None, :, None] < count[:, None, None])
    memory.requires_grad_()
    f_scores = torch.rand(p, generator=gen, dtype=torch.float64).add(0.05).requires_grad_()
    m_scores = None
    if with_memory_scores:
        m_scores = torch.rand(C, N, generator=gen, dtype=torch.float64).add(0.05)
        m_scores = m_scores.requires_grad_()
    return features, classes, memory, count, f_scores, m_scores


@pytest.mark.parametrize("with_memory_scores", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_matches_naive_value_and_gradients(with_memory_scores, seed):
    features, classes, memory, count, f_scores, m_scores = make_inputs(seed, with_memory_scores)
    inputs = [features, f_scores] + ([m_scores] if m_scores is not None else [])
    ours = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    ref = naive(features, classes, memory, count, f_scores, m_scores, C)
    assert ref.item() > 0.01
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)
    got = torch.autograd.grad(ours, inputs + [memory], allow_unused=True)
    want = torch.autograd.grad(ref, inputs)
    for g, w in zip(got, want, strict=False):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)
    assert got[-1] is None  # the memory is a constant


def test_no_feature_scores_equals_unit_scores():
    features, classes, memory, count, _, m_scores = make_inputs(3, True)
    ones = torch.ones(features.shape[0], dtype=features.dtype)
    a = contrastive_loss(features, classes, memory, count, None, m_scores, C)
    b = contrastive_loss(features, classes, memory, count, ones, m_scores, C)
    ref = naive(features, classes, memory, count, None, m_scores, C)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("with_memory_scores", [True, False])
def test_pairwise_port_matches_closed_form(with_memory_scores):
    features, classes, memory, count, f_scores, m_scores = make_inputs(5, with_memory_scores)
    inputs = [features, f_scores] + ([m_scores] if m_scores is not None else [])
    ours = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    pair = contrastive_loss_pairwise(features, classes, memory, count, f_scores, m_scores, C)
    torch.testing.assert_close(ours, pair, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ours, inputs), torch.autograd.grad(pair, inputs)
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_skipped_classes_contribute_nothing():
    features, classes, memory, count, f_scores, m_scores = make_inputs(7, True)
    base = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    # Moving the single class-4 pixel's feature changes nothing (|F_4| = 1).
    lone = (classes == 4).nonzero()[0, 0]
    moved = features.detach().clone()
    moved[lone] = torch.randn(D, dtype=moved.dtype)
    again = contrastive_loss(moved, classes, memory, count, f_scores, m_scores, C)
    torch.testing.assert_close(base, again)
    # Emptying class 0's memory removes exactly its term.
    emptied = count.clone()
    emptied[0] = 1
    without = contrastive_loss(features, classes, memory, emptied, f_scores, m_scores, C)
    keep = classes == 0
    only0 = naive(features[keep], classes[keep], memory, count, f_scores[keep], m_scores, C)
    torch.testing.assert_close(base - without, only0, rtol=1e-8, atol=1e-10)


def test_divides_by_num_classes_not_classes_present():
    features, classes, memory, count, f_scores, m_scores = make_inputs(2, True)
    five = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    padded_memory = torch.cat([memory.detach(), torch.zeros(5, N, D, dtype=memory.dtype)])
    padded_count = torch.cat([count, torch.zeros(5, dtype=torch.long)])
    padded_scores = torch.cat([m_scores.detach(), torch.ones(5, N, dtype=m_scores.dtype)])
    ten = contrastive_loss(
        features, classes, padded_memory, padded_count, f_scores, padded_scores, 2 * C
    )
    torch.testing.assert_close(ten * 2, five)


def test_float32_close_to_float64():
    features, classes, memory, count, f_scores, m_scores = make_inputs(4, True)
    exact = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    single = contrastive_loss(
        features.float(), classes, memory.float(), count, f_scores.float(), m_scores.float(), C
    )
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    features, classes, memory, count, f_scores, m_scores = make_inputs(6, True)
    cpu = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    moved = [t.detach().cuda() for t in (features, classes, memory, count, f_scores, m_scores)]
    moved[0].requires_grad_()
    gpu = contrastive_loss(*moved, C)
    gpu.backward()
    torch.testing.assert_close(gpu.cpu(), cpu.detach(), rtol=1e-10, atol=1e-12)
    (cpu_grad,) = torch.autograd.grad(cpu, features)
    torch.testing.assert_close(moved[0].grad.cpu(), cpu_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    features, classes, memory, count, f_scores, m_scores = make_inputs(8, True)
    moved = [
        t.detach().float().cuda() if t.is_floating_point() else t.cuda()
        for t in (features, classes, memory, count, f_scores, m_scores)
    ]
    moved[0].requires_grad_()
    moved[4].requires_grad_()
    moved[5].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = contrastive_loss(*moved, C)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved[0].grad is not None and moved[5].grad is not None


def test_centroid_cosine_gradcheck():
    from memseg_bench.methods.contrastive import CentroidCosine

    gen = torch.Generator().manual_seed(9)
    features = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    centroid = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 3, (12,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda f, m: CentroidCosine.apply(f, m, index), (features, centroid)
    )


def test_loss_benchmark_variants_agree():
    from memseg_bench.bench.loss import VARIANTS, run_variant

    rows = {
        v: run_variant(v, "embedded", threads=1, repeats=1, dtype_name="float64", device="cpu")
        for v in VARIANTS
    }
    assert rows["term_other_form"]["loss_value"] == pytest.approx(
        rows["term_ours"]["loss_value"], rel=1e-9
    )
    assert rows["distance_closed"]["loss_value"] == pytest.approx(
        rows["distance_pairwise"]["loss_value"], rel=1e-9
    )
    assert rows["term_ours"]["loss_value"] == pytest.approx(
        rows["term_pairwise"]["loss_value"], rel=1e-9
    )
    for row in rows.values():
        assert row["total_s"] > 0 and row["peak_mib"] >= 0
    assert rows["term_ours"]["bank_s"] > 0


def test_peak_memory_sees_a_new_allocation():
    from memseg_bench.bench.loss import PeakMemory

    peak = PeakMemory("cpu")
    peak.start()
    if not peak.method.startswith("VmHWM"):
        pytest.skip("the resident high-water mark cannot be reset here")
    # 64 MiB in small pages, every page written: a few 2 MiB huge-page faults can stay in the
    # kernel's per-thread counters and never reach the resident set that the peak reads.
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    rise = peak.stop()
    block.close()
    assert 56 <= rise < 512


def test_low_precision_features_are_computed_in_float32():
    features, classes, memory, count, f_scores, m_scores = make_inputs(10, True)
    exact = contrastive_loss(features, classes, memory, count, f_scores, m_scores, C)
    half = features.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(
            half, classes, memory.float(), count, f_scores.float(), m_scores.float(), C
        )
    assert loss.dtype == torch.float32
    loss.backward()
    assert half.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), exact, rtol=2e-2, atol=1e-3)
