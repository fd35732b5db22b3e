"""BatchNorm running statistics recomputed on images after training."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def recalibrate_batchnorm(net: nn.Module, images: Iterable[torch.Tensor]) -> int:
    """Forward every batch of `images` through `net` in train mode without gradients, so that
    each BatchNorm's running statistics move towards those batches at the layer's own momentum
    (nothing is reset first; dropout is active as in training). Weights do not change. The
    images are on the net's device already; returns how many batches went through."""
    was_training = net.training
    net.train()
    count = 0
    with torch.no_grad():
        for batch in images:
            net(batch)
            count += 1
    net.train(was_training)
    return count
