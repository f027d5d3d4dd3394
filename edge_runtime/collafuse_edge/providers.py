"""onnxruntime itself and its execution providers: importing it, the TensorRT → CUDA → CPU walk,
each provider's options, loading the GPU libraries, and starting an ``InferenceSession``.

onnxruntime is not a hard dependency of collafuse-edge, because a Jetson gets its GPU build
from NVIDIA's own wheels; it is imported here, on first use, with a message that says what to
install when neither build is present.

Example::

    ort = import_onnxruntime()
    names = choose_providers(("cuda", "cpu"), ort.get_available_providers())
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import CLASS_LABELS, SAMPLE, TIMESTEP, Bundle
from .errors import InputError
from .graph_cache import default_trt_cache_dir

if TYPE_CHECKING:  # the config lives with the denoiser; only its fields are read here
    from .session import SessionConfig

INSTALL_HINT = (
    "collafuse-edge needs onnxruntime to run a bundle, but neither the CPU build (package "
    "'onnxruntime') nor the GPU build ('onnxruntime-gpu') is installed. Install one: "
    "pip install 'collafuse-edge[cpu]' or 'collafuse-edge[gpu]'; on a Jetson, install NVIDIA's "
    "onnxruntime-gpu wheel for your JetPack release."
)

# Short names accepted in SessionConfig.providers, in the order "auto" tries them.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

log = logging.getLogger("collafuse_edge")


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module (CPU or GPU build), or an ImportError saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return onnxruntime


def full_provider_name(name: str) -> str:
    if name in PROVIDER_NAMES.values():
        return name
    full = PROVIDER_NAMES.get(str(name).lower())
    if full is None:
        raise InputError(f"unknown execution provider {name!r}; use one of "
                         f"{', '.join(PROVIDER_NAMES)} or a full onnxruntime provider name")
    return full


def choose_providers(requested: tuple[str, ...] | None, available: list[str]) -> list[str]:
    """The providers to ask onnxruntime for. An explicitly requested provider that this
    onnxruntime build lacks is refused (never silently replaced by the CPU)."""
    if requested is None:
        chosen = [p for p in PROVIDER_NAMES.values() if p in available]
        return chosen or ["CPUExecutionProvider"]
    chosen = [full_provider_name(p) for p in requested]
    missing = [p for p in chosen if p not in available]
    if missing:
        raise InputError(
            f"execution provider(s) {', '.join(missing)} are not available in this onnxruntime "
            f"build (available: {', '.join(available)}); install the GPU build or choose another"
        )
    return chosen


def provider_options(provider: str, cfg: SessionConfig, bundle: Bundle) -> dict:
    """The options onnxruntime gets for ``provider`` under ``cfg`` (TensorRT: its engine cache and
    the batch range of its optimisation profile; CUDA: device, TF32, CUDA graphs)."""
    if provider == "TensorrtExecutionProvider":
        cache = Path(cfg.trt_cache_dir) if cfg.trt_cache_dir else default_trt_cache_dir(bundle)
        cache.mkdir(parents=True, exist_ok=True)
        c, h, w = bundle.image_shape

        def shapes(b: int) -> str:
            parts = [f"{SAMPLE}:{b}x{c}x{h}x{w}", f"{TIMESTEP}:{b}"]
            if bundle.conditional:
                parts.append(f"{CLASS_LABELS}:{b}")
            return ",".join(parts)

        return {
            "device_id": cfg.device_id,
            "trt_fp16_enable": cfg.trt_fp16,
            "trt_int8_enable": bundle.precision == "int8",  # explicit QDQ scales, no calibration
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": shapes(1),
            "trt_profile_opt_shapes": shapes(min(16, cfg.trt_max_batch)),
            "trt_profile_max_shapes": shapes(cfg.trt_max_batch),
        }
    if provider == "CUDAExecutionProvider":
        opts = {"device_id": cfg.device_id, "use_tf32": int(cfg.cuda_tf32)}
        if cfg.cuda_graph:
            opts["enable_cuda_graph"] = 1
        return opts
    return {}



def gpu_hint(ort: Any) -> str:
    """What a GPU provider of this onnxruntime build needs, for error messages."""
    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda = getattr(info, "cuda_version", None) or "12 or 13"
    except Exception:  # an unusual build (e.g. a Jetson wheel): no version to quote
        cuda = "matching"
    return (f"onnxruntime {getattr(ort, '__version__', '?')} runs its CUDA provider with the CUDA {cuda} runtime, "
            "cuBLAS, cuFFT, cuRAND and cuDNN 9 libraries (pip: 'onnxruntime-gpu[cuda,cudnn]', which "
            "'collafuse-edge[gpu]' installs; on a Jetson they come with JetPack), and its TensorRT "
            "provider with the TensorRT 10 libraries as well. Install them, or choose --provider cpu")


_preloaded: dict[str, str] = {}


def preload_gpu_libraries(ort: Any) -> str:
    """Load the CUDA/cuDNN libraries that pip's ``nvidia-*`` packages ship, the way onnxruntime's
    own ``preload_dlls`` does, once per process; returns what it printed (it speaks on stdout,
    which this keeps clean for the CLI's output). A no-op where onnxruntime has no such helper."""
    if "done" in _preloaded:
        return _preloaded["done"]
    text = ""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                preload()
        except Exception as e:  # a missing library shows up below, when the provider starts
            buf.write(f"preload_dlls failed: {e}\n")
        text = buf.getvalue().strip()
        if text:
            log.debug("onnxruntime.preload_dlls: %s", text)
    _preloaded["done"] = text
    return text


def new_session(ort: Any, path: Path, so: Any, providers: list) -> Any:
    """An ``InferenceSession`` on exactly ``providers``."""
    # enable_fallback=0: onnxruntime's own retry prints to stdout and drops to the CPU alone
    return ort.InferenceSession(str(path), sess_options=so, providers=providers, enable_fallback=0)


_SOURCE_PREFIX = re.compile(r"^\S+\.(?:cc|cpp|h):\d+ [^(]*\([^)]*\) ")


def first_line(e: Exception) -> str:
    """The first line of an onnxruntime error, without its C++ source location."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return _SOURCE_PREFIX.sub("", text.splitlines()[0])[:300]


__all__ = ["GPU_PROVIDERS", "INSTALL_HINT", "PROVIDER_NAMES", "choose_providers", "first_line", "full_provider_name",
           "gpu_hint", "import_onnxruntime", "new_session", "preload_gpu_libraries", "provider_options"]
