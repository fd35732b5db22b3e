"""Batched augmentation: geometry keeps image / label / confidence aligned, ClassMix, randomness."""

import colorsys

import pytest
import torch
from torch.nn import functional as F

from memseg_bench.config import AugmentSide
from memseg_bench.data.augment import (
    _hsv_to_rgb,
    _rgb_to_hsv,
    augment,
    classmix,
    colour_jitter,
    gaussian_blur,
)

NOTHING = AugmentSide(
    scale_prob=0.0, flip_prob=0.0, jitter_prob=0.0, jitter_strength=0.25, blur_prob=0.0
)
EVERYTHING = AugmentSide(
    scale_prob=1.0, flip_prob=0.5, jitter_prob=1.0, jitter_strength=0.25, blur_prob=1.0
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def block_batch(batch=4, size=(48, 40), block=8, classes=10, seed=0):
    """Labels in random 8x8 blocks; the image's red channel and the confidence encode the label."""
    g = gen(seed)
    h, w = size
    coarse = torch.randint(0, classes, (batch, h // block, w // block), generator=g)
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)
    images = torch.stack([labels * 20.0, 255 - labels * 20.0, torch.full_like(labels, 7.0)], 1)
    confidence = (labels.float() + 1) / (classes + 1)
    return images.float(), labels, confidence


def run(side, images, labels, confidence, seed=0, scale_range=(0.75, 1.75), per_image=True):
    return augment(
        images, labels, confidence, side, scale_range, (0.1, 1.5), gen(seed), per_image=per_image
    )


def test_shapes_dtypes_and_label_values():
    images, labels, confidence = block_batch()
    out = run(EVERYTHING, images, labels, confidence)
    assert [t.shape for t in out] == [images.shape, labels.shape, confidence.shape]
    assert [t.dtype for t in out] == [images.dtype, labels.dtype, confidence.dtype]
    assert set(out[1].unique().tolist()) <= set(range(10)) | {255}
    assert out[0].min() >= 0 and out[0].max() <= 255
    assert confidence.min() >= 0 and out[2].max() <= 1
    img, lab, conf = run(EVERYTHING, images, labels, None)
    assert conf is None and img.shape == images.shape


def test_nothing_is_identity_and_flip_is_exact():
    images, labels, confidence = block_batch()
    out = run(NOTHING, images, labels, confidence)
    for a, b in zip(out, (images, labels, confidence), strict=True):
        assert torch.equal(a, b)
    flip = AugmentSide(scale_prob=0.0, flip_prob=1.0, jitter_prob=0.0, blur_prob=0.0)
    out = run(flip, images, labels, confidence)
    for a, b in zip(out, (images, labels, confidence), strict=True):
        assert torch.equal(a, b.flip(-1))


@pytest.mark.parametrize("scale_range", [(0.6, 0.9), (1.2, 1.9), (0.75, 1.75)])
def test_affine_keeps_image_label_confidence_aligned(scale_range):
    images, labels, confidence = block_batch(batch=8)
    side = AugmentSide(scale_prob=1.0, flip_prob=0.5, jitter_prob=0.0, blur_prob=0.0)
    img, lab, conf = run(side, images, labels, confidence, seed=3, scale_range=scale_range)
    assert not torch.equal(lab, labels)
    valid = lab != 255
    assert valid.float().mean() > 0.3
    # Away from block edges bilinear values are pure label codes; there the nearest-neighbour
    # label must name the same class (a misaligned or unflipped label map would not).
    code_image, code_conf = img[:, 0] / 20, conf * 11 - 1
    for code in (code_image, code_conf):
        pure = valid & ((code - code.round()).abs() < 1e-3)
        assert pure.sum() > 0.5 * valid.sum()
        assert (code.round().long()[pure] == lab[pure]).float().mean() > 0.995
    # padding: image 0, label 255, confidence 0, all at the same pixels
    pad = ~valid
    assert torch.all(img[:, :, :][pad[:, None].expand_as(img)] == 0)
    assert torch.all(conf[pad] == 0)
    if scale_range[0] > 1:
        assert valid.all()  # zoom in: a crop inside the image, no padding
    if scale_range[1] < 1:
        assert pad[:, 0, :].all() and pad[:, :, -1].all()  # zoom out: centred with padding


def test_zoom_out_is_centred():
    images, labels, confidence = block_batch(batch=2, size=(40, 40))
    side = AugmentSide(scale_prob=1.0, flip_prob=0.0, jitter_prob=0.0, blur_prob=0.0)
    _, lab, _ = run(side, images, labels, confidence, scale_range=(0.5, 0.5))
    valid = (lab != 255).nonzero()
    rows, cols = valid[:, 1], valid[:, 2]
    assert rows.min() == 10 and rows.max() == 29
    assert cols.min() == 10 and cols.max() == 29


def test_colour_jitter_and_blur_change_only_the_image():
    images, labels, confidence = block_batch()
    side = AugmentSide(scale_prob=0.0, flip_prob=0.0, jitter_prob=1.0, blur_prob=1.0)
    img, lab, conf = run(side, images, labels, confidence)
    assert torch.equal(lab, labels) and torch.equal(conf, confidence)
    assert (img - images).abs().mean() > 1.0


def test_hsv_round_trip_and_reference_values():
    g = gen(4)
    rgb = torch.rand(2, 3, 5, 5, generator=g)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(rgb)), rgb, atol=1e-5, rtol=0)
    hsv = _rgb_to_hsv(rgb)
    for r, gg, b, h, s, v in zip(*rgb[0].flatten(1), *hsv[0].flatten(1), strict=True):
        expected = colorsys.rgb_to_hsv(float(r), float(gg), float(b))
        assert [float(h), float(s), float(v)] == pytest.approx(expected, abs=1e-5)
    # zero strength (factors 1, hue shift 0) leaves the image unchanged
    images = torch.rand(2, 3, 6, 6, generator=g) * 255
    same = colour_jitter(images, 0.0, torch.rand(2, 4, generator=g))
    torch.testing.assert_close(same, images, atol=1e-3, rtol=0)


def test_blur_uses_one_kernel_per_image():
    g = gen(5)
    images = torch.rand(3, 3, 20, 24, generator=g) * 255
    sigma_x = torch.tensor([0.5, 1.0, 1.5])
    sigma_y = torch.tensor([0.5, 0.2, 1.5])
    out = gaussian_blur(images, sigma_x, sigma_y, radius=5)
    for i in range(3):
        taps = torch.arange(-5, 6, dtype=torch.float32)
        kx = torch.exp(-(taps**2) / (2 * sigma_x[i] ** 2))
        ky = torch.exp(-(taps**2) / (2 * sigma_y[i] ** 2))
        kernel = (ky[:, None] * kx[None, :]) / (kx.sum() * ky.sum())
        padded = F.pad(images[i : i + 1], (5, 5, 5, 5), mode="reflect")
        expected = F.conv2d(padded, kernel.expand(3, 1, 11, 11), groups=3)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-3, rtol=1e-5)


def test_deterministic_with_seeded_generator():
    images, labels, confidence = block_batch(batch=6)
    a = run(EVERYTHING, images, labels, confidence, seed=11)
    b = run(EVERYTHING, images, labels, confidence, seed=11)
    c = run(EVERYTHING, images, labels, confidence, seed=12)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def flipped_or_not(out, images):
    return [
        bool(torch.equal(o, i.flip(-1))) if not torch.equal(o, i) else False
        for o, i in zip(out, images, strict=True)
    ]


def test_per_batch_decisions_are_shared():
    images, labels, confidence = block_batch(batch=12)
    side = AugmentSide(scale_prob=0.0, flip_prob=0.5, jitter_prob=0.0, blur_prob=0.0)
    seen = set()
    for seed in range(6):
        out = run(side, images, labels, confidence, seed=seed, per_image=False)
        decisions = flipped_or_not(out[1], labels)
        assert len(set(decisions)) == 1
        seen.add(decisions[0])
    assert seen == {True, False}
    out = run(side, images, labels, confidence, seed=0, per_image=True)
    assert len(set(flipped_or_not(out[1], labels))) == 2


def mix_batch():
    """Three 16x16 images with disjoint class sets {0,1,2}, {3,4,5,6}, {7} plus ignored pixels."""
    sets = [[0, 1, 2], [3, 4, 5, 6], [7]]
    labels = torch.stack([torch.tensor(s).repeat(256)[:256].view(16, 16) for s in sets])
    labels[:, 0, :3] = 255
    images = torch.stack([torch.full((3, 16, 16), 10.0 * (i + 1)) for i in range(3)])
    images = images + labels[:, None].clamp(max=20)
    confidence = torch.rand(3, 16, 16, generator=gen(1))
    return sets, images, labels, confidence


def test_classmix_picks_half_plus_one_and_shares_the_mask():
    sets, images, labels, confidence = mix_batch()
    img, lab, conf = classmix(images, labels, confidence, 1.0, gen(2), num_classes=8)
    for i in range(3):
        j = (i + 1) % 3
        pasted = set(lab[i].unique().tolist()) & set(sets[j])
        assert len(pasted) == len(sets[j]) // 2 + 1
        mask = torch.isin(labels[j], torch.tensor(sorted(pasted)))
        assert torch.equal(lab[i], torch.where(mask, labels[j], labels[i]))
        assert torch.equal(img[i], torch.where(mask, images[j], images[i]))
        assert torch.equal(conf[i], torch.where(mask, confidence[j], confidence[i]))


def test_classmix_drop_background_and_probability():
    labels = torch.stack([torch.tensor([0, 1, 2]).repeat(6)[:16].view(4, 4), torch.zeros(4, 4)])
    labels = labels.long()
    images = torch.rand(2, 3, 4, 4) * 255
    for seed in range(5):
        _, lab, _ = classmix(images, labels, None, 1.0, gen(seed), 3, drop_background=True)
        # onto image 1 (all background) from image 0: two of {1, 2}, never the background
        assert set(lab[1].unique().tolist()) == {0, 1, 2}
        assert torch.equal(lab[1][labels[0] == 0], torch.zeros_like(lab[1][labels[0] == 0]))
        # onto image 0 from image 1: background is its only class, so it is pasted
        assert torch.equal(lab[0], torch.zeros_like(lab[0]))
    out = classmix(images, labels, None, 0.0, gen(0), 3)
    assert torch.equal(out[1], labels)
    sets, images, labels, confidence = mix_batch()
    outcomes = set()
    for seed in range(8):
        _, lab, _ = classmix(images, labels, confidence, 0.5, gen(seed), 8, per_image=False)
        mixed = [not torch.equal(lab[i], labels[i]) for i in range(3)]
        assert len(set(mixed)) == 1
        outcomes.add(mixed[0])
    assert outcomes == {True, False}


@pytest.mark.gpu
def test_cuda_matches_cpu():
    images, labels, confidence = block_batch()
    g_cpu = torch.Generator().manual_seed(0)
    g_gpu = torch.Generator(device="cuda").manual_seed(0)
    side = AugmentSide(scale_prob=0.0, flip_prob=1.0, jitter_prob=0.0, blur_prob=0.0)
    cpu = augment(images, labels, confidence, side, (0.75, 1.75), (0.1, 1.5), g_cpu)
    gpu = augment(
        images.cuda(), labels.cuda(), confidence.cuda(), side, (0.75, 1.75), (0.1, 1.5), g_gpu
    )
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())
    out = augment(
        images.cuda(), labels.cuda(), confidence.cuda(), EVERYTHING, (0.75, 1.75), (0.1, 1.5), g_gpu
    )
    assert out[0].is_cuda and out[1].dtype == torch.long
    mixed = classmix(images.cuda(), labels.cuda(), confidence.cuda(), 1.0, g_gpu, 10)
    assert mixed[1].is_cuda


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    images, labels, confidence = (t.cuda() for t in block_batch(batch=6))
    g_gpu = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for per_image in (True, False):
            mixed = classmix(images, labels, confidence, 0.7, g_gpu, 10, True, per_image)
            out = augment(*mixed, EVERYTHING, (0.75, 1.75), (0.1, 1.5), g_gpu, per_image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out[0].shape == images.shape
