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

    Every call's argmax classes are kept in `classes`; given the `classes` of an earlier pass over
    the same images in the same order, it also counts the pixels whose class the two agree on."""

    training = False

    def __init__(self, session, compare_with: list[np.ndarray] | None = None) -> None:
        self.session = session
        self.compare_with = compare_with
        self.classes: list[np.ndarray] = []
        self.pixels = 0
        self.agreeing = 0

    def eval(self) -> SessionSegmenter:
        return self

    def train(self, mode: bool = True) -> SessionSegmenter:
        return self

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        feed = {INPUT_NAME: np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)}
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        classes = logits.argmax(1)
        if self.compare_with is not None:
            self.agreeing += int((classes == self.compare_with[len(self.classes)]).sum())
            self.pixels += classes.size
        self.classes.append(classes)
        return torch.from_numpy(logits), None

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.pixels if self.pixels else None


def score_session(
    session, config, compare_with: list[np.ndarray] | None = None
) -> tuple[dict, SessionSegmenter]:
    """Scores of `session` on config's evaluation split, and the segmenter that ran it (its
    argmax `classes`, and its `agreement` with `compare_with`, the classes of another pass)."""
    from memseg_bench.data.datasets import open_dataset
    from memseg_bench.scoring import score_split

    index = open_dataset(config.data)
    segmenter = SessionSegmenter(session, compare_with)
    scores = score_split(segmenter, index, config.evaluate.split, config, "cpu", progress=False)
    return scores, segmenter
