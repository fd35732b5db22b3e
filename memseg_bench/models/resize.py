"""The one bilinear resize of logits and feature maps (align_corners off, as the paper's code)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resized(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """NCHW maps resized bilinearly to `size` (H, W); returned as they are at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
