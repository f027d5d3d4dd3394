"""What the runtime keeps on disk between starts: the CPU-optimised graph of a bundle's model
(:class:`GraphCache`) and the folder of TensorRT engines (:func:`default_trt_cache_dir`), both
under ``$XDG_CACHE_HOME/collafuse-edge`` and keyed by the model's sha256.

Example::

    cache = GraphCache(cache_base() / "ort-optimized", bundle, ort.__version__, "all")
    path = cache.lookup()            # a verified optimised graph, or None
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

from .bundle import Bundle
from .files import atomic_write_text, sha256_file

log = logging.getLogger("collafuse_edge")


def cache_base() -> Path:
    """``$XDG_CACHE_HOME/collafuse-edge`` (``~/.cache/collafuse-edge`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "collafuse-edge"


def model_sha(bundle: Bundle) -> str:
    """The manifest's sha256 of the bundle's model file."""
    return next(f.sha256 for f in bundle.files if f.path == bundle.model_file.name)


def default_trt_cache_dir(bundle: Bundle) -> Path:
    """``$XDG_CACHE_HOME/collafuse-edge/tensorrt/<model sha256 prefix>`` (engines are per model)."""
    return cache_base() / "tensorrt" / model_sha(bundle)[:16]


def trt_engine_files(folder: Path) -> list[Path]:
    """The TensorRT engines onnxruntime has cached in ``folder`` (none when it does not exist)."""
    try:
        return sorted(p for p in Path(folder).iterdir() if p.suffix == ".engine" and p.is_file())
    except OSError:
        return []


def cpu_fingerprint() -> str:
    """What an optimised CPU graph depends on besides the model: the machine's instruction set
    (onnxruntime bakes NCHWc layouts and kernels chosen for it into the saved graph)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    # (platform.processor() would add nothing here and costs a `uname -p` subprocess per start)
    return f"{platform.machine()}|{flags.strip()}"


class GraphCache:
    """The bundle's model as onnxruntime optimised it on this machine, saved once and loaded
    with graph optimisation off on later starts (CPU provider only): a cold start then skips the
    optimiser (measured ~0.25 s → ~0.09 s for the client preset on this repo's 2-core box).

    The key covers the model's sha256, the onnxruntime version, the optimisation level and the
    CPU's instruction-set flags. Entries are written atomically with a sha256 sidecar; an entry
    that fails its hash or its load is ignored and rebuilt. A cache that cannot be written (a
    read-only home) only costs the speed-up."""

    def __init__(self, root: Path, bundle: Bundle, ort_version: str, level: str):
        st = bundle.model_file.stat()  # size and mtime too: a bundle loaded without hash checks
        key = hashlib.sha256("|".join([model_sha(bundle), f"{st.st_size}:{st.st_mtime_ns}", ort_version,
                                       level, cpu_fingerprint()]).encode()).hexdigest()[:24]
        self.root = root
        self.model = root / f"{key}.onnx"
        self.sidecar = root / f"{key}.sha256"

    def lookup(self) -> Path | None:
        try:
            want = self.sidecar.read_text(encoding="ascii").strip()
            if sha256_file(self.model) == want:
                return self.model
            log.info("optimised-graph cache entry %s fails its hash; rebuilding it", self.model.name)
        except (OSError, UnicodeDecodeError):
            pass
        return None

    def temp_target(self) -> Path | None:
        """A fresh file name in the cache folder for onnxruntime to save the optimised graph to."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=self.root)
            os.close(fd)
            return Path(name)
        except OSError as e:
            log.info("optimised-graph cache %s is not writable (%s); starting without it", self.root, e)
            return None

    def commit(self, tmp: Path) -> None:
        """Move the saved graph into place, then write its sidecar; leaves no temp file behind."""
        try:
            digest = sha256_file(tmp)
            os.replace(tmp, self.model)  # the model first: a sidecar never names a missing file
            atomic_write_text(self.sidecar, digest + "\n")
        except OSError as e:
            log.info("could not save the optimised graph to %s (%s)", self.root, e)
        finally:
            tmp.unlink(missing_ok=True)


__all__ = ["GraphCache", "cache_base", "cpu_fingerprint", "default_trt_cache_dir", "model_sha", "trt_engine_files"]
