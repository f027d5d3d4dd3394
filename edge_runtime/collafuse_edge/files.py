"""Files written whole or not at all, their sha256, and strict JSON.

Every package writes through these: a reader never sees half a file, and a crash or a full disk
leaves the previous version in place (temp file in the same folder, fsync, ``os.replace``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically; parent folders are created. ``mode``: the file's
    permissions (mkstemp's 0600 would make shared, read-only artefacts unreadable to others)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644) -> None:
    """Strict JSON (see :func:`jsonable`), indented, sorted keys, trailing newline."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n", mode)


def sha256_file(path: str | os.PathLike, chunk: int = 2**20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON values: numpy scalars/arrays → Python numbers/lists, tuples → lists,
    paths → str, ±inf → "inf"/"-inf" (the PSNR of an exact copy), NaN → None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "jsonable", "sha256_file"]
