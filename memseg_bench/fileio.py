"""Atomic file writes and image reading with errors that name the file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from memseg_bench.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def _eight_bit(image):
    """A 16-bit greyscale image scaled to 8 bits (Pillow's conversion would clip it at 255)."""
    from PIL import Image

    if not image.mode.startswith("I;16"):
        return image
    wide = np.asarray(image).astype(np.uint32)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


def read_image(path: str | Path, orient: bool = False) -> np.ndarray:
    """RGB uint8 array (H, W, 3), as stored, or with `orient` turned by its EXIF orientation tag
    as viewers display it. Dataset images are read as stored: their labels were made that way.
    16-bit greyscale is scaled to 8 bits."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if orient:
                image = ImageOps.exif_transpose(image)
            return np.asarray(_eight_bit(image).convert("RGB"))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def read_label(path: str | Path) -> np.ndarray:
    """Class-index label (H, W) uint8 from a single-channel or palette PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise UserError(
                    f"label {path} has mode {image.mode}: expected a single-channel class-index PNG"
                )
            array = np.asarray(image)
    except FileNotFoundError:
        raise UserError(f"label not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read label {path}: {error}") from None
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 255:
            raise UserError(f"label {path} has values outside 0..255")
        array = array.astype(np.uint8)
    return array


def write_bytes(path: str | Path, data) -> None:
    """Write `data` atomically through the temporary file's own descriptor: one open, one write,
    one rename (about 0.1 ms less per small file than atomic_path's reopen)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_jpeg(path: str | Path, array: np.ndarray, quality: int) -> None:
    """Write a uint8 RGB array as JPEG atomically (encoded in memory first), colour at full
    resolution (4:4:4), so that the sharp colour edges of a mask overlay stay sharp."""
    import io

    from PIL import Image

    encoded = io.BytesIO()
    Image.fromarray(array).save(encoded, format="JPEG", quality=quality, subsampling=0)
    _write_encoded(path, encoded)


def _write_encoded(path: str | Path, encoded) -> None:
    try:
        write_bytes(path, encoded.getbuffer())
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


def save_png(
    path: str | Path,
    array: np.ndarray,
    palette: list[list[int]] | None = None,
    compress_level: int = 6,
) -> None:
    """Write a uint8 array as PNG atomically; a (H, W) array with a palette becomes mode P.
    zlib's `compress_level` 1 encodes several times faster than the default 6, in larger files."""
    import io

    from PIL import Image

    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        flat = [v for rgb in palette for v in rgb]
        image.putpalette(flat + [0] * (768 - len(flat)))
    encoded = io.BytesIO()  # encoded first, so that a failed encode leaves no file behind
    image.save(encoded, format="PNG", compress_level=compress_level)
    _write_encoded(path, encoded)
