"""Writing generated images: ``.npy`` (numpy only) or a PNG grid (Pillow, the ``png`` extra).

Images are float32 ``[B,C,H,W]`` in [-1, 1], C = 1 (grey) or 3 (RGB). Both are written
atomically (a reader never sees half a file). A PNG carries what made it as text chunks
(``collafuse:model_version``, ``collafuse:seed``, ``collafuse:labels``, ``collafuse:bundle_sha256``, …;
read them back with :func:`read_png_metadata` or any PNG tool).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import InputError
from .files import atomic_write_bytes

PNG_KEY_PREFIX = "collafuse:"

PNG_HINT = "writing PNG files needs Pillow: pip install 'collafuse-edge[png]' (or write .npy instead)"
OUTPUT_SUFFIXES = (".png", ".npy")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B,C,H,W]`` in [-1, 1] → uint8 ``[B,H,W,C]`` (values outside [-1, 1] are clipped)."""
    if images.ndim != 4:
        raise InputError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    x = (np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``[B,C,H,W]`` images into one uint8 ``[H', W', C]`` grid, ``nrow`` images per row."""
    tiles = to_uint8(images)
    b, h, w, c = tiles.shape
    if b == 0:
        raise InputError("there are no images to put in a grid")
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = tiles[i]
    return grid


def write_png(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None,
              metadata: Mapping[str, object] | None = None) -> Path:
    """Write ``[B,C,H,W]`` images in [-1, 1] as one PNG grid; ``metadata`` become text chunks
    ``collafuse:<key>`` (values as text; None values are left out)."""
    try:
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo
    except ImportError as e:
        raise ImportError(PNG_HINT) from e
    if images.shape[1] not in (1, 3):
        raise InputError(f"PNG needs 1 or 3 channels, got {images.shape[1]}; write .npy instead")
    grid = make_grid(images, nrow)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    info = PngInfo()
    for key, value in (metadata or {}).items():
        if value is not None:
            info.add_text(PNG_KEY_PREFIX + key, value if isinstance(value, str) else _text(value))
    buf = io.BytesIO()
    Image.fromarray(grid[:, :, 0] if mode == "L" else grid, mode=mode).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _text(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ",".join(str(int(v)) if isinstance(v, (int, np.integer)) else str(v) for v in np.asarray(value).ravel())
    return str(value)


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``collafuse:*`` text chunks of a PNG written by :func:`write_png`, without the prefix."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(PNG_HINT) from e
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return {k[len(PNG_KEY_PREFIX):]: v for k, v in text.items() if k.startswith(PNG_KEY_PREFIX)}


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path that :func:`save_images` could not write, before any work is spent."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"output file {str(p)!r} must end in .png or .npy")
    if suffix == ".png":
        try:
            import PIL  # noqa: F401
        except ImportError as e:
            raise ImportError(PNG_HINT) from e
    if not p.parent.is_dir():
        raise InputError(f"output folder {str(p.parent)!r} does not exist")
    return p


def save_images(path: str | os.PathLike, images: np.ndarray, metadata: Mapping[str, object] | None = None) -> Path:
    """``.npy``: the float32 array as is; ``.png``: a grid carrying ``metadata``. Other suffixes
    are refused."""
    p = check_output_path(path)
    if p.suffix.lower() == ".npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(images, dtype=np.float32), allow_pickle=False)
        atomic_write_bytes(p, buf.getvalue())
        return p
    return write_png(p, images, metadata=metadata)
