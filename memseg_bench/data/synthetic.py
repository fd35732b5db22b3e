"""The embedded dataset: procedurally generated street-free scenes of textured shapes.

Every foreground class has its own shape AND its own texture; colours are drawn per instance from
one distribution shared by all classes (and the background), so colour alone says nothing.
Backgrounds are cluttered (gradients, smooth noise, blobs, lines) and hold "distractor" ellipses
that carry class textures but no class shape. Objects occlude each other, and about half of them
get a 1-2 px ignore band on their border, as in real annotations.

Each image is drawn from its own generator seeded by (seed, split, index), so the bytes depend
only on the config, never on the order of generation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memseg_bench.config import SyntheticConfig
from memseg_bench.errors import UserError
from memseg_bench.labels import IGNORE

GENERATOR_VERSION = 2
STAMP = "synthetic.json"
CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "cross", "star")
PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SceneParams:
    """How cluttered and how hard a scene is (sizes are fractions of the image side).

    Chosen so that the supervised model of the embedded preset (DeepLabv3+-R18, 64-wide, from
    scratch, 200 iterations on 2 CPU cores) separates label counts. With any-hue objects, more
    clutter and textured distractors, 20 and 400 labeled images both ended near 15-17 test mIoU
    (the model had learnt two classes when the schedule ended). With these values it learns
    every class, and 20 labels fall clearly below 400 (seeds 0 / 1: 25.0 / 27.2 vs 39.9 / 31.6).
    """

    objects: tuple[int, int] = (2, 4)  # inclusive range of objects per image
    radius: tuple[float, float] = (0.25, 0.4)
    object_contrast: tuple[float, float] = (120.0, 180.0)  # texture amplitude, 0..255 scale
    distractors: tuple[int, int] = (0, 0)  # background ellipses carrying an object texture
    distractor_contrast: tuple[float, float] = (15.0, 40.0)
    clutter: float = 0.3  # scales the background gradient, smooth noise and blobs
    noise: tuple[float, float] = (1.0, 2.0)  # pixel noise sigma
    band_prob: float = 0.5  # share of objects with an ignore band on their border
    # Hue range of an object's base colour around its class's own hue, as a fraction of the
    # colour circle; 1.0 draws any hue (colour then says nothing about the class).
    hue_spread: float = 0.25


# -- shapes and textures in object-local coordinates (u, v): the unit is the object radius ------


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r, phi = _polar(u, v)
    if cls == 1:  # disc
        return r <= 1.0
    if cls == 2:  # square (same area order as the disc)
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if cls == 3:  # equilateral triangle, circumradius 1
        inside = np.ones(u.shape, bool)
        for k in range(3):
            angle = np.pi / 2 + k * 2 * np.pi / 3
            inside &= u * np.cos(angle) + v * np.sin(angle) >= -0.5
        return inside
    if cls == 4:  # ring
        return (r <= 1.0) & (r >= rng.uniform(0.45, 0.62))
    if cls == 5:  # cross
        arm = rng.uniform(0.24, 0.34)
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if cls == 6:  # five-pointed star
        frac = (5 * phi / (2 * np.pi)) % 1.0
        peak = 1.0 - 2.0 * np.minimum(frac, 1.0 - frac)
        return r <= 0.42 + 0.58 * peak
    raise ValueError(f"no shape for class {cls}")


def _texture(
    kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator, size: int
) -> np.ndarray:
    """A pattern in [0, 1]; `kind` 1..6 is the texture of class `kind`."""
    freq = rng.uniform(2.0, 3.0)
    if kind == 1:  # dots
        a = (u * freq) % 1.0 - 0.5
        b = (v * freq) % 1.0 - 0.5
        return (a * a + b * b < 0.09).astype(np.float32)
    if kind == 2:  # stripes at their own angle
        angle = rng.uniform(0, np.pi)
        return (np.sin(2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle))) > 0).astype(
            np.float32
        )
    if kind == 3:  # checker
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    if kind == 4:  # smooth shading, no pattern
        angle = rng.uniform(0, 2 * np.pi)
        return np.clip(0.5 + 0.5 * (u * np.cos(angle) + v * np.sin(angle)), 0, 1)
    if kind == 5:  # blocky noise
        block = int(rng.integers(1, 3))
        cells = rng.random((size // block + 1, size // block + 1), dtype=np.float32)
        return np.kron(cells, np.ones((block, block), np.float32))[:size, :size]
    if kind == 6:  # concentric rings
        return (np.sin(2 * np.pi * freq * np.hypot(u, v)) > 0).astype(np.float32)
    raise ValueError(f"no texture {kind}")


# -- image helpers --------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [-1, 1]: low-frequency clutter."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i0 = np.minimum(pos.astype(int), cells - 1)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _shift_or(mask: np.ndarray, invert: bool) -> np.ndarray:
    """One step of 4-neighbour dilation (or erosion when `invert`) with a false border."""
    m = ~mask if invert else mask
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return ~out if invert else out


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(25, 230, 3).astype(np.float32)


def _class_colour(rng: np.random.Generator, cls: int, spread: float) -> np.ndarray:
    """A colour whose hue lies within `spread` of class `cls`'s hue (six hues round the circle)."""
    hue = (cls / 6.0 + rng.uniform(-spread / 2, spread / 2)) % 1.0
    saturation, value = rng.uniform(0.45, 1.0), rng.uniform(0.35, 0.9)
    rgb = np.clip(np.abs((hue * 6.0 + np.array([0.0, 4.0, 2.0])) % 6.0 - 3.0) - 1.0, 0.0, 1.0)
    return (255.0 * value * (1.0 - saturation * (1.0 - rgb))).astype(np.float32)


def _paint(image: np.ndarray, mask: np.ndarray, pattern: np.ndarray, rng, base, contrast) -> None:
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(*contrast) + rng.normal(0, 12, 3)
    other = np.clip(base + delta, 0, 255).astype(np.float32)
    colours = base + pattern[..., None] * (other - base)
    image[mask] = colours[mask]


def _local(xx, yy, cx, cy, radius, angle):
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    return (c * dx + s * dy) / radius, (-s * dx + c * dy) / radius


def render_sample(
    rng: np.random.Generator, size: int, params: SceneParams = SceneParams()
) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label uint8 HxW) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    unit = size / 64.0

    # Background: colour + gradient + smooth noise + blobs + lines.
    image = np.empty((size, size, 3), np.float32)
    image[:] = _random_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / size)[..., None]
    image += ramp * rng.uniform(-70, 70, 3) * params.clutter
    for cells in (3, 8):
        image += _smooth_noise(rng, size, cells)[..., None] * rng.uniform(5, 30, 3) * params.clutter
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(0, size, 2)
        sigma = rng.uniform(3, 12) * unit
        bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        image += bump[..., None] * rng.uniform(-45, 45, 3) * params.clutter
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        distance = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle))
        line = distance < rng.uniform(0.5, 1.5) * unit
        alpha = rng.uniform(0.2, 0.5)
        image[line] = (1 - alpha) * image[line] + alpha * _random_colour(rng)
    label = np.zeros((size, size), np.uint8)

    # Distractors: elongated ellipses carrying a class texture, labelled background.
    for _ in range(rng.integers(params.distractors[0], params.distractors[1] + 1)):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(*params.radius) * size
        u, v = _local(xx, yy, cx, cy, radius, rng.uniform(0, np.pi))
        mask = (u / 1.2) ** 2 + (v / rng.uniform(0.25, 0.45)) ** 2 <= 1.0
        pattern = _texture(int(rng.integers(1, 7)), u, v, rng, size)
        _paint(image, mask, pattern, rng, _random_colour(rng), params.distractor_contrast)

    # Objects, painted in order: later ones occlude earlier ones in the image and the label.
    for _ in range(rng.integers(params.objects[0], params.objects[1] + 1)):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        cx, cy = rng.uniform(-0.05, 1.05, 2) * size
        radius = rng.uniform(*params.radius) * size
        u, v = _local(xx, yy, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        mask = _shape_mask(cls, u, v, rng)
        if not mask.any():
            continue
        pattern = _texture(cls, u, v, rng, size)
        base = _class_colour(rng, cls, params.hue_spread)
        _paint(image, mask, pattern, rng, base, params.object_contrast)
        shade = (u * rng.uniform(-1, 1) + v * rng.uniform(-1, 1))[..., None] * rng.uniform(5, 20)
        image[mask] += shade[mask]
        label[mask] = cls
        if rng.random() < params.band_prob:
            band = mask & ~_shift_or(mask, invert=True)
            if size >= 48 and rng.random() < 0.5:
                band |= _shift_or(mask, invert=False) & ~mask
            label[band] = IGNORE

    # Photometric variation of the whole image.
    image = (image - 128.0) * rng.uniform(0.7, 1.2) + 128.0 + rng.uniform(-30, 30)
    if rng.random() < 0.3:  # slight blur
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        image = 0.5 * image + 0.125 * (
            padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        )
    image += rng.normal(0, rng.uniform(*params.noise), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


# -- the dataset on disk -------------------------------------------------------------------


def _stamp(cfg: SyntheticConfig) -> dict:
    scene = dataclasses.asdict(SceneParams())
    return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(cfg), "scene": scene}


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def _build(folder: Path, cfg: SyntheticConfig) -> None:
    counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    for split_code, split in enumerate(SPLITS):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        ids = [f"{split}_{i:05d}" for i in range(counts[split])]
        for i, item in enumerate(ids):
            rng = np.random.default_rng([cfg.seed, split_code, i])
            image, label = render_sample(rng, cfg.size)
            _write_png(folder / "images" / split / f"{item}.png", image)
            _write_png(folder / "labels" / split / f"{item}.png", label)
        (folder / f"{split}.txt").write_text("".join(f"{item}\n" for item in ids))
    classes = {
        "name": "memseg_bench synthetic shapes",
        "classes": list(CLASS_NAMES),
        "palette": [list(c) for c in PALETTE],
        "num_classes": len(CLASS_NAMES),
        "ignore_index": IGNORE,
    }
    (folder / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    stamp = json.loads(json.dumps(_stamp(cfg)))  # tuples as lists, as read back
    (folder / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")


def _existing_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def generate_synthetic(root: Path, cfg: SyntheticConfig) -> None:
    """Generate the dataset into `root` unless it already holds the same config."""
    root = Path(root)
    for name, value in (("n_train", cfg.n_train), ("n_val", cfg.n_val), ("n_test", cfg.n_test)):
        if value < 0:
            raise UserError(f"params: 'data.synthetic.{name}' must be >= 0, got {value}")
    if cfg.size < 16:
        raise UserError(f"params: 'data.synthetic.size' must be >= 16, got {cfg.size}")
    wanted = json.loads(json.dumps(_stamp(cfg)))
    if root.exists():
        found = _existing_stamp(root)
        if found == wanted:
            return
        what = "another config" if found is not None else "no synthetic.json stamp"
        raise UserError(
            f"data.root {root} exists with {what}: delete the folder to regenerate "
            f"data.synthetic {dataclasses.asdict(cfg)}"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp, cfg)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: accept its result if it is the same config.
            if _existing_stamp(root) != wanted:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
