"""Batched augmentation on the device of the inputs: colour jitter, Gaussian blur, one affine
resampling (random scale + horizontal flip) and ClassMix, for a whole batch at once.

Images are float RGB in 0..255 [B, 3, H, W]; labels long [B, H, W] with 255 = ignore; the
teacher confidence [B, H, W] (optional) follows the labels. Every random number comes from the
given torch.Generator; `per_image=False` draws every decision once per batch. No host
synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from memseg_bench.config import AugmentSide, StrongAugmentConfig
from memseg_bench.labels import IGNORE


def _rand(generator: torch.Generator, batch: int, per_image: bool, device, count: int = 1):
    """Uniform [batch, count] draws on `device`; one row repeated when not per image."""
    rows = batch if per_image else 1
    values = torch.rand((rows, count), generator=generator, device=generator.device)
    return values.to(device).expand(batch, count)


def _uniform(low: float, high: float, unit: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * unit


# -- colour --------------------------------------------------------------------------------------


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.unbind(1)
    high, _ = rgb.max(dim=1)
    low, _ = rgb.min(dim=1)
    delta = high - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        high == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)), 0.0)
    return torch.stack([hue, sat, high], dim=1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, sat, value = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = (5.0 - 2.0 * torch.arange(3, device=hsv.device, dtype=hsv.dtype)).view(1, 3, 1, 1)
    k = torch.remainder(n + hue * 6.0, 6.0)
    return value - value * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def colour_jitter(images: torch.Tensor, strength: float, units: torch.Tensor) -> torch.Tensor:
    """Brightness and contrast in [1 - s, 1 + s], saturation in [1 - s/2, 1 + s/2], hue shift in
    [-s/3, s/3] (fraction of the hue circle), in this fixed order; units [B, 4] in [0, 1)."""
    return jitter_colours(images, strength, strength, strength / 2, strength / 3, units)


def jitter_colours(
    images: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    units: torch.Tensor,
) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - x, 1 + x] (at least 0), a hue shift in
    [-hue, hue] (fraction of the hue circle), in this fixed order; units [B, 4] in [0, 1)."""
    view = (-1, 1, 1, 1)
    brightness = _uniform(max(0.0, 1 - brightness), 1 + brightness, units[:, 0]).view(view)
    contrast = _uniform(max(0.0, 1 - contrast), 1 + contrast, units[:, 1]).view(view)
    saturation = _uniform(max(0.0, 1 - saturation), 1 + saturation, units[:, 2]).view(view)
    hue = _uniform(-hue, hue, units[:, 3]).view(view)
    x = (images * brightness).clamp(0.0, 255.0)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0.0, 255.0)
    gray = _gray(x)
    x = ((x - gray) * saturation + gray).clamp(0.0, 255.0)
    hsv = _rgb_to_hsv(x / 255.0)
    hsv = torch.cat([torch.remainder(hsv[:, 0:1] + hue, 1.0), hsv[:, 1:]], dim=1)
    return (_hsv_to_rgb(hsv) * 255.0).clamp(0.0, 255.0)


def grayscale(images: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Images [B] where `apply` [B] is set become their luma (ITU-R 601) in all three channels."""
    gray = _gray(images).expand_as(images)
    return torch.where(apply[:, None, None, None], gray, images)


def _kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [B, 2 radius + 1] for sigmas [B]."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    weights = torch.exp(-(taps[None] ** 2) / (2.0 * sigma[:, None] ** 2))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(
    images: torch.Tensor, sigma_x: torch.Tensor, sigma_y: torch.Tensor, radius: int
) -> torch.Tensor:
    """Separable blur with one (possibly anisotropic) kernel per image: grouped convolutions."""
    batch, channels, height, width = images.shape
    radius = max(0, min(radius, height - 1, width - 1))
    if radius == 0:
        return images
    kx = _kernels(sigma_x.to(images.dtype), radius).repeat_interleave(channels, dim=0)
    ky = _kernels(sigma_y.to(images.dtype), radius).repeat_interleave(channels, dim=0)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kx[:, None, None, :], groups=batch * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, ky[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


# -- geometry ------------------------------------------------------------------------------------


def affine_params(
    scale: torch.Tensor, flip: torch.Tensor, offset_units: torch.Tensor
) -> torch.Tensor:
    """theta [B, 2, 3] mapping output to input normalised coordinates for scales s [B]: s < 1
    shrinks the image into the centre (padding around), s > 1 enlarges it and crops a window at a
    random offset (offset_units [B, 2] in [0, 1)); flip [B] mirrors horizontally."""
    inverse = 1.0 / scale
    reach = (1.0 - inverse).clamp(min=0.0)
    tx = (2.0 * offset_units[:, 0] - 1.0) * reach
    ty = (2.0 * offset_units[:, 1] - 1.0) * reach
    sign = torch.where(flip, -1.0, 1.0).to(scale.dtype)
    zero = torch.zeros_like(scale)
    return torch.stack(
        [torch.stack([sign * inverse, zero, tx], 1), torch.stack([zero, inverse, ty], 1)], 1
    )


def resample(
    images: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor | None,
    theta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One affine resampling: image and confidence bilinear, labels nearest; outside the source
    image: image 0, label 255, confidence 0."""
    batch, channels, height, width = images.shape
    grid = F.affine_grid(theta.to(images.dtype), [batch, 1, height, width], align_corners=False)
    inside = (grid.abs() <= 1.0).all(dim=-1)
    planes = images if confidence is None else torch.cat([images, confidence[:, None]], dim=1)
    smooth = F.grid_sample(
        planes, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    smooth = torch.where(inside[:, None], smooth, torch.zeros_like(smooth))
    nearest = (
        F.grid_sample(
            labels[:, None].to(images.dtype),
            grid,
            mode="nearest",
            padding_mode="border",
            align_corners=False,
        )[:, 0]
        .round()
        .long()
    )
    nearest = torch.where(inside, nearest, torch.full_like(nearest, IGNORE))
    out_conf = None if confidence is None else smooth[:, channels]
    return smooth[:, :channels], nearest, out_conf


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor | None,
    side: AugmentSide,
    scale_range: tuple[float, float],
    blur_sigma: tuple[float, float],
    generator: torch.Generator,
    per_image: bool = True,
    anisotropic_blur: bool = False,
    blur_taps: int | None = None,
    photometric_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Colour jitter, blur, then one affine resampling (scale + flip) per image; with
    `photometric_last` the resampling comes first.

    Photometric steps first keep the padding exactly 0. Images whose scale was not drawn keep
    their pixels exactly (a flip is then an exact mirror)."""
    batch = images.shape[0]
    device = images.device

    def photometric(images: torch.Tensor) -> torch.Tensor:
        apply_jitter = draws[:, 0] < side.jitter_prob
        if side.jitter_prob > 0:
            jittered = colour_jitter(images, side.jitter_strength, draws[:, 1:5])
            images = torch.where(apply_jitter[:, None, None, None], jittered, images)
        if side.blur_prob > 0:
            apply_blur = draws[:, 5] < side.blur_prob
            sigma_x = _uniform(blur_sigma[0], blur_sigma[1], draws[:, 6])
            sigma_y = sigma_x
            if anisotropic_blur:
                sigma_y = _uniform(blur_sigma[0], blur_sigma[1], draws[:, 7])
            radius = math.ceil(3.0 * max(blur_sigma)) if blur_taps is None else blur_taps // 2
            blurred = gaussian_blur(images, sigma_x, sigma_y, radius)
            images = torch.where(apply_blur[:, None, None, None], blurred, images)
        return images

    with torch.no_grad():
        draws = _rand(generator, batch, per_image, device, count=13)
        if not photometric_last:
            images = photometric(images)
        apply_scale = draws[:, 8] < side.scale_prob
        scale = torch.where(apply_scale, _uniform(scale_range[0], scale_range[1], draws[:, 9]), 1.0)
        flip = draws[:, 10] < side.flip_prob
        offsets = draws[:, 11:13]
        theta = affine_params(scale.to(images.dtype), flip, offsets.to(images.dtype))
        warped = resample(images, labels, confidence, theta)
        image_flip = flip[:, None, None, None]
        label_flip = flip[:, None, None]
        scaled4, scaled3 = apply_scale[:, None, None, None], apply_scale[:, None, None]
        images = torch.where(scaled4, warped[0], torch.where(image_flip, images.flip(-1), images))
        labels = torch.where(scaled3, warped[1], torch.where(label_flip, labels.flip(-1), labels))
        if confidence is not None:
            confidence = torch.where(
                scaled3, warped[2], torch.where(label_flip, confidence.flip(-1), confidence)
            )
        if photometric_last:
            images = photometric(images)
    return images, labels, confidence


# -- ClassMix ------------------------------------------------------------------------------------


def classmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor | None,
    prob: float,
    generator: torch.Generator,
    num_classes: int,
    drop_background: bool = False,
    per_image: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Output i pastes, from source j = (i + 1) mod B, the pixels of floor(n/2) + 1 of the n
    classes present in labels[j] (255 dropped; with drop_background class 0 too unless it is the
    only one) onto image i; image, label and confidence use the same mask. Applied to each image
    with probability `prob` (one decision for the batch when not per image)."""
    if prob <= 0:
        return images, labels, confidence
    batch = images.shape[0]
    device = images.device
    with torch.no_grad():
        apply = _rand(generator, batch, per_image, device)[:, 0] < prob
        keys = torch.rand((batch, num_classes), generator=generator, device=generator.device)
        keys = keys.to(device)
        source_labels = torch.roll(labels, shifts=-1, dims=0)
        flat = source_labels.reshape(batch, -1)
        ids = torch.where((flat >= 0) & (flat < num_classes), flat, num_classes)
        present = torch.zeros((batch, num_classes + 1), dtype=torch.bool, device=device)
        present = present.scatter(1, ids, True)[:, :num_classes]
        if drop_background:
            alone = present.sum(dim=1) == 1
            present[:, 0] = present[:, 0] & alone
        n = present.sum(dim=1)
        rank = torch.where(present, keys, 2.0).argsort(dim=1).argsort(dim=1)
        chosen = present & (rank < (n // 2 + 1)[:, None]) & apply[:, None]
        chosen = torch.cat([chosen, chosen.new_zeros((batch, 1))], dim=1)
        mask = chosen.gather(1, ids).view_as(labels)
        images = torch.where(mask[:, None], torch.roll(images, -1, 0), images)
        labels = torch.where(mask, source_labels, labels)
        if confidence is not None:
            confidence = torch.where(mask, torch.roll(confidence, -1, 0), confidence)
    return images, labels, confidence


# -- the strong view of FixMatch / UniMatch ------------------------------------------------------


def strong_colour(
    images: torch.Tensor, settings: StrongAugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Colour jitter, grayscale and Gaussian blur, each drawn per image with its probability
    (images float 0..255 [B, 3, H, W]); no geometric change, so labels stay where they are."""
    batch = images.shape[0]
    with torch.no_grad():
        draws = _rand(generator, batch, True, images.device, count=8)
        jittered = jitter_colours(
            images,
            settings.brightness,
            settings.contrast,
            settings.saturation,
            settings.hue,
            draws[:, 1:5],
        )
        images = torch.where(
            (draws[:, 0] < settings.jitter_prob)[:, None, None, None], jittered, images
        )
        images = grayscale(images, draws[:, 5] < settings.grayscale_prob)
        low, high = settings.blur_sigma
        sigma = _uniform(low, high, draws[:, 7])
        blurred = gaussian_blur(images, sigma, sigma, math.ceil(3.0 * high))
        images = torch.where(
            (draws[:, 6] < settings.blur_prob)[:, None, None, None], blurred, images
        )
    return images


def cutmix_boxes(
    batch: int,
    height: int,
    width: int,
    prob: float,
    area: tuple[float, float],
    aspect: tuple[float, float],
    generator: torch.Generator,
    device=None,
) -> torch.Tensor:
    """One axis-aligned box per image, drawn with probability `prob` (else an empty mask): its
    area a uniform share of the crop in `area`, its aspect h / w uniform in `aspect` (narrowed
    to what fits the crop at that area), its position uniform over where it fits. bool
    [B, H, W]. Drawn without a rejection loop, so without host synchronisation."""
    device = device or generator.device
    with torch.no_grad():
        draws = torch.rand((batch, 5), generator=generator, device=generator.device).to(device)
        size = _uniform(area[0], area[1], draws[:, 1]) * (height * width)
        # w = sqrt(size / r) <= width and h = sqrt(size * r) <= height bound r from both sides.
        low = torch.clamp(size / width**2, min=aspect[0])
        high = torch.clamp(height**2 / size, max=aspect[1])
        ratio = _uniform(low, torch.maximum(low, high), draws[:, 2])
        box_w = torch.sqrt(size / ratio).floor().clamp(1, width)
        box_h = torch.sqrt(size * ratio).floor().clamp(1, height)
        left = (draws[:, 3] * (width - box_w + 1)).floor()
        top = (draws[:, 4] * (height - box_h + 1)).floor()
        cols = torch.arange(width, device=device).view(1, 1, width)
        rows = torch.arange(height, device=device).view(1, height, 1)
        view = (-1, 1, 1)
        inside_w = (cols >= left.view(view)) & (cols < (left + box_w).view(view))
        inside_h = (rows >= top.view(view)) & (rows < (top + box_h).view(view))
        drawn = (draws[:, 0] < prob).view(view)
        return inside_w & inside_h & drawn


def paste(box: torch.Tensor, targets, sources) -> tuple[torch.Tensor, ...]:
    """Each target tensor with the pixels inside `box` [B, H, W] taken from the matching source
    tensor: images [B, C, H, W] and per-pixel maps [B, H, W] (labels, confidence, validity)."""
    pasted = []
    for target, source in zip(targets, sources, strict=True):
        mask = box[:, None] if target.dim() == 4 else box
        pasted.append(torch.where(mask, source, target))
    return tuple(pasted)
