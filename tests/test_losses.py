"""Self-training losses: ramp, supervised / pseudo-label CE, entropy, class weights."""

import math

import pytest
import torch
from torch.nn import functional as F

from memseg_bench.methods.losses import (
    class_weights_from_counts,
    entropy_loss,
    pseudo_label_ce,
    ramp,
    supervised_ce,
)


def test_ramp():
    assert ramp(0, 2000) == pytest.approx(math.exp(-5))
    assert ramp(1000, 2000) == pytest.approx(math.exp(-5 * 0.25))
    assert ramp(2000, 2000) == 1.0
    assert ramp(5000, 2000) == 1.0
    assert ramp(3, 0) == 1.0


def test_supervised_ce_upsamples_and_ignores():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 4, generator=gen)
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    labels[0, :3] = 255
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    valid = labels != 255
    logp = F.log_softmax(up, dim=1).permute(0, 2, 3, 1)[valid]
    expected = -logp.gather(1, labels[valid][:, None]).mean()
    torch.testing.assert_close(supervised_ce(logits, labels), expected)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    w = weights[labels[valid]]
    weighted = -(w * logp.gather(1, labels[valid][:, None])[:, 0]).sum() / w.sum()
    torch.testing.assert_close(supervised_ce(logits, labels, weights), weighted)


def test_pseudo_label_ce_weights_and_counts_all_pixels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 6, generator=gen)
    labels = torch.randint(0, 3, (2, 6, 6), generator=gen)
    labels[1, :2] = 255
    conf = torch.rand(2, 6, 6, generator=gen)
    logp = F.log_softmax(logits, dim=1)
    safe = labels.clamp(max=2)
    ce = -logp.gather(1, safe[:, None])[:, 0]
    expected = torch.where(labels != 255, ce * conf**6, 0.0).sum() / labels.numel()
    torch.testing.assert_close(pseudo_label_ce(logits, labels, conf), expected)
    expected2 = torch.where(labels != 255, ce * conf**2, 0.0).sum() / labels.numel()
    torch.testing.assert_close(pseudo_label_ce(logits, labels, conf, power=2.0), expected2)
    weights = torch.tensor([0.5, 1.0, 2.0])
    expected_w = torch.where(labels != 255, weights[safe] * ce * conf**6, 0.0).mean()
    got = pseudo_label_ce(logits, labels, conf, class_weights=weights)
    torch.testing.assert_close(got, expected_w)


def test_entropy_normalised_and_its_three_forms():
    uniform = torch.zeros(3, 5, 2, 2)
    assert entropy_loss(uniform).item() == pytest.approx(1.0)
    peaked = torch.zeros(3, 5, 2, 2)
    peaked[:, 0] = 50.0
    assert entropy_loss(peaked).item() == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, 3, 3, generator=gen)
    p = logits.softmax(1)
    expected = (-(p * p.log()).sum(1) / math.log(5)).mean()
    torch.testing.assert_close(entropy_loss(logits), expected)
    torch.testing.assert_close(entropy_loss(logits, form="broadcast"), 4 * expected)
    labels = torch.randint(0, 5, (4, 3, 3), generator=gen)
    labels[:, 0] = 255  # a padded band
    per_pixel = -(p * p.log()).sum(1) / math.log(5)
    masked = entropy_loss(logits, labels, form="masked")
    torch.testing.assert_close(masked, per_pixel[:, 1:].mean())
    assert (masked - entropy_loss(logits, labels)).abs() > 1e-4  # unmasked counts the band
    assert entropy_loss(logits, torch.full_like(labels, 255), form="masked") == 0


def test_class_weights_from_counts():
    counts = torch.tensor([100.0, 25.0, 400.0, 0.0])
    weights = class_weights_from_counts(counts)
    freq = torch.tensor([100.0, 25.0, 400.0]) / 525
    median = freq[0]
    expected_seen = torch.sqrt(median / freq)
    torch.testing.assert_close(weights[:3], expected_seen.float())
    assert weights[3] == weights[1]  # unseen class: like the rarest seen class
    assert torch.isfinite(weights).all()
    even = class_weights_from_counts(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    median = (2.0 + 3.0) / 2 / 10  # median of an even count averages the middle pair
    torch.testing.assert_close(even, torch.sqrt(median / (torch.tensor([1.0, 2, 3, 4]) / 10)))
    assert torch.equal(class_weights_from_counts(torch.zeros(3)), torch.ones(3))


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    logits = torch.randn(2, 4, 8, 8, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4, (2, 16, 16), device="cuda")
    labels[:, 0] = 255
    conf = torch.rand(2, 16, 16, device="cuda")
    counts = torch.tensor([5.0, 0.0, 3.0, 9.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights = class_weights_from_counts(counts)
        loss = (
            supervised_ce(logits, labels, weights)
            + pseudo_label_ce(logits, labels, conf, class_weights=weights)
            + entropy_loss(logits, labels, form="masked")
        )
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.grad is not None


def test_supervised_ce_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 4, 4), 255)
    loss = supervised_ce(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    weighted = supervised_ce(logits, labels, torch.tensor([1.0, 2.0, 3.0]))
    assert weighted.item() == 0.0
