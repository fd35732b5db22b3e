"""Score an ONNX Runtime session on a protocol's evaluation split with the evaluation code that
scores PyTorch models (same loader, mode, window and metrics), and count how often two sessions
agree pixel for pixel."""

from __future__ import annotations

import numpy as np
import torch

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class SessionSegmenter:
    """An onnxruntime session behind the segmenter interface evaluation calls: images
    [B, 3, H, W] float 0..255 in, (logits, no features) out.

    With a `reference` session, every call also runs it on the same images and counts the pixels
    whose argmax class the two agree on."""

    training = False

    def __init__(self, session, reference=None) -> None:
        self.session = session
        self.reference = reference
        self.pixels = 0
        self.agreeing = 0

    def eval(self) -> SessionSegmenter:
        return self

    def train(self, mode: bool = True) -> SessionSegmenter:
        return self

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        feed = {INPUT_NAME: np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)}
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        if self.reference is not None:
            (expected,) = self.reference.run([OUTPUT_NAME], feed)
            self.agreeing += int((logits.argmax(1) == expected.argmax(1)).sum())
            self.pixels += logits.shape[0] * logits.shape[2] * logits.shape[3]
        return torch.from_numpy(logits), None

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.pixels if self.pixels else None


def score_session(session, config, reference=None) -> tuple[dict, float | None]:
    """(scores of `session` on config's evaluation split, pixel agreement with `reference`)."""
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.scoring import score_split

    index = open_dataset(config.data)
    segmenter = SessionSegmenter(session, reference)
    scores = score_split(segmenter, index, config.evaluate.split, config, "cpu", progress=False)
    return scores, segmenter.agreement
