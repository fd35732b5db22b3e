"""The one bilinear resize of logits and feature maps.

align_corners (model.align_corners) picks the sampling grid: False maps pixel areas onto pixel
areas (the paper's default here); True puts the corner pixels' centres onto each other, as the
reference code's resizes do."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resized(x: torch.Tensor, size: Sequence[int], *, align_corners: bool) -> torch.Tensor:
    """NCHW maps resized bilinearly to `size` (H, W); returned as they are at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)
