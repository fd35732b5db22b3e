"""Self-training baseline: EMA teacher pseudo-labels, two strong ClassMix views,
p^power-weighted CE, entropy term: the full method without memory bank and contrastive loss."""

from __future__ import annotations

import torch

from memseg_bench.data.augment import augment, classmix
from memseg_bench.labels import IGNORE
from memseg_bench.methods.context import (
    StepContext,
    StudentPass,
    confidence_and_labels,
    started,
    teacher_forward,
)
from memseg_bench.methods.contrastive import class_index
from memseg_bench.methods.ema import ema_alpha, ema_update
from memseg_bench.methods.losses import (
    class_weights_from_counts,
    entropy_loss,
    epoch_window_class_weights,
    pseudo_label_ce,
    ramp,
    supervised_ce,
)
from memseg_bench.methods.method import Method
from memseg_bench.methods.supervised import augment_labeled
from memseg_bench.models.resize import resized


@torch.no_grad()
def pseudo_labels(ctx: StepContext, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher confidence and argmax on the un-augmented unlabeled crops, at crop size."""
    logits, _ = teacher_forward(ctx, images)
    return confidence_and_labels(logits, images.shape[-2:], ctx.config.model.align_corners)


def strong_views(ctx: StepContext, images, labels, confidence, step: int):
    """Two independently augmented views of each unlabeled image (image, pseudo-label and p).

    Per-image draws augment both views as one batch; per-batch draws augment each view as its own
    batch, so the two views still get their own ClassMix decision and their own draws."""
    settings = ctx.config.train.augment
    selftrain = ctx.config.methods.selftrain
    mixing = started(ctx, step, selftrain.ramp_iterations)
    mix_prob = settings.unlabeled.classmix_prob if mixing else 0.0
    if settings.draws == "per_image":
        both = (torch.cat([t, t]) for t in (images, labels, confidence))
        return _strong_view(ctx, *both, mix_prob=mix_prob, per_image=True)
    views = [
        _strong_view(ctx, images, labels, confidence, mix_prob=mix_prob, per_image=False)
        for _ in range(2)
    ]
    return tuple(torch.cat(parts) for parts in zip(*views, strict=True))


def _strong_view(ctx: StepContext, images, labels, confidence, mix_prob: float, per_image: bool):
    """ClassMix with the pseudo-labels, then the strong photometric and geometric steps."""
    settings = ctx.config.train.augment
    images, labels, confidence = classmix(
        images,
        labels,
        confidence,
        prob=mix_prob,
        generator=ctx.generator,
        num_classes=ctx.num_classes,
        drop_background=settings.classmix_drop_background,
        per_image=per_image,
    )
    return augment(
        images,
        labels,
        confidence,
        side=settings.unlabeled,
        scale_range=settings.scale_range,
        blur_sigma=settings.blur_sigma,
        generator=ctx.generator,
        per_image=per_image,
        anisotropic_blur=settings.blur_shape == "anisotropic",
        blur_taps=settings.blur_taps,
        photometric_last=settings.photometric_order == "after_geometry",
    )


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixels per class as float [C]; ids outside 0..C-1 (e.g. 255) are not counted. index_add
    instead of bincount, which would read the largest id on the host."""
    index, inside = class_index(labels.flatten(), num_classes)
    return torch.zeros(num_classes, device=labels.device).index_add_(0, index, inside.float())


def _decayed_class_weights(ctx: StepContext, labels: torch.Tensor, pseudo: torch.Tensor, step: int):
    """Cityscapes weighting from GT and recent pseudo-label counts, from class_weights_start on."""
    counts = sum(class_counts(t, ctx.num_classes) for t in (labels, pseudo))
    previous = ctx.extra_state.get("class_counts")
    counts = counts if previous is None else 0.99 * previous + counts
    ctx.extra_state["class_counts"] = counts
    if not started(ctx, step, ctx.config.methods.selftrain.class_weights_start):
        return None
    return class_weights_from_counts(counts)


def _epoch_window_class_weights(ctx: StepContext, labels, pseudo, step: int):
    """Weighting from the first labeled epoch's label counts and the last unlabeled epoch's
    pseudo-label counts, one row per step in extra_state (a ring buffer for the unlabeled rows)."""
    state = ctx.extra_state
    labeled_steps = ctx.n_labeled // labels.shape[0]
    unlabeled_steps = ctx.n_unlabeled // pseudo.shape[0]
    if "labeled_rows" not in state:
        state["labeled_rows"] = labels.new_zeros(
            (labeled_steps, ctx.num_classes), dtype=torch.float64
        )
        state["unlabeled_rows"] = labels.new_zeros(
            (unlabeled_steps, ctx.num_classes), dtype=torch.float64
        )
        state["counted_steps"] = 0
    counted = state["counted_steps"]
    if counted < labeled_steps:
        state["labeled_rows"][counted] = class_counts(labels, ctx.num_classes).double()
    if unlabeled_steps > 0:
        state["unlabeled_rows"][counted % unlabeled_steps] = class_counts(
            pseudo, ctx.num_classes
        ).double()
    state["counted_steps"] = counted = counted + 1
    settings = ctx.config.methods.selftrain
    filled = counted >= max(labeled_steps, unlabeled_steps)
    if not filled or not started(ctx, step, settings.class_weights_start):
        return None
    share = min(1.0, counted / ctx.config.train.iterations)
    return epoch_window_class_weights(state["labeled_rows"], state["unlabeled_rows"], share)


def class_weights(ctx: StepContext, labeled: dict, pseudo, labeled_labels, view_labels, step: int):
    """The class weights of L_sup and L_pseudo (None: unweighted), counted as
    methods.selftrain.class_counts says: on the raw labels and pseudo-labels (epoch_window) or on
    the augmented ones (decayed)."""
    settings = ctx.config.methods.selftrain
    if not settings.class_weights:
        return None
    if settings.class_counts == "epoch_window":
        return _epoch_window_class_weights(ctx, labeled["label"], pseudo, step)
    return _decayed_class_weights(ctx, labeled_labels, view_labels, step)


@torch.no_grad()
def pseudo_label_quality(pseudo, confidence, hidden_labels) -> dict[str, torch.Tensor]:
    """How good the teacher's pseudo-labels are, measured against the ground truth that the
    unlabeled images have but training never reads: pixel accuracy over labeled pixels, and the
    mean confidence. Diagnostics only (logged, never in a loss)."""
    valid = hidden_labels != IGNORE
    correct = (pseudo == hidden_labels) & valid
    return {
        "pseudo_accuracy": correct.sum() / valid.sum().clamp(min=1),
        "pseudo_confidence": confidence.mean(),
    }


def student_forward(ctx: StepContext, labeled_images, view_images):
    """(labeled logits, labeled features, view logits, view features): one forward on both
    batches (joint: BatchNorm statistics over labeled images and views together), or the views
    and then the labeled batch (separate)."""
    net = ctx.model["net"]
    if ctx.config.methods.selftrain.student_forward == "separate":
        view_logits, view_features = net(view_images)
        labeled_logits, labeled_features = net(labeled_images)
        return labeled_logits, labeled_features, view_logits, view_features
    n_labeled = labeled_images.shape[0]
    logits, features = net(torch.cat([labeled_images, view_images]))
    return logits[:n_labeled], features[:n_labeled], logits[n_labeled:], features[n_labeled:]


def forward(ctx: StepContext, labeled: dict, unlabeled: dict, step: int):
    """Shared by selftrain and memseg: returns the loss terms and what the memory method needs."""
    selftrain = ctx.config.methods.selftrain
    align_corners = ctx.config.model.align_corners
    with ctx.timer("teacher_forward"):
        confidence, pseudo = pseudo_labels(ctx, unlabeled["image"])
    with ctx.timer("augment"):
        labeled_images, labeled_labels = augment_labeled(ctx, labeled)
        view_images, view_labels, view_confidence = strong_views(
            ctx, unlabeled["image"], pseudo, confidence, step
        )
    with ctx.timer("student_forward"):
        labeled_logits, labeled_features, view_logits, view_features = student_forward(
            ctx, labeled_images, view_images
        )
        weights = class_weights(ctx, labeled, pseudo, labeled_labels, view_labels, step)
        terms = {
            "sup": supervised_ce(
                labeled_logits, labeled_labels, class_weights=weights, align_corners=align_corners
            ),
            "pseudo": ramp(step, selftrain.ramp_iterations)
            * pseudo_label_ce(
                view_logits,
                view_labels,
                view_confidence,
                power=selftrain.pseudo_power,
                class_weights=weights,
                align_corners=align_corners,
            ),
            "ent": selftrain.entropy_weight
            * entropy_loss(
                resized(view_logits, view_labels.shape[-2:], align_corners=align_corners),
                view_labels,
                selftrain.entropy,
            ),
        }
    student = StudentPass(
        labeled_images=labeled_images,
        labeled_labels=labeled_labels,
        labeled_features=labeled_features,
        view_features=view_features,
        view_labels=view_labels,
        diagnostics=pseudo_label_quality(pseudo, confidence, unlabeled["label"]),
    )
    return terms, student


def losses(ctx: StepContext, labeled: dict, unlabeled: dict | None, step: int):
    assert unlabeled is not None
    return forward(ctx, labeled, unlabeled, step)


def update_teacher(ctx: StepContext, step: int) -> None:
    """The EMA step of the mean teacher, after the student's optimiser step."""
    settings = ctx.config.methods.selftrain
    alpha = ema_alpha(step, ctx.config.train.iterations, settings.ema_final, settings.ema_to_one)
    ema_update(ctx.teacher, ctx.model, alpha, copy_buffers=settings.teacher_copy_buffers)


METHOD = Method(
    losses=losses,
    needs_unlabeled=True,
    needs_teacher=True,
    update_teacher=update_teacher,
    section="selftrain",
)
