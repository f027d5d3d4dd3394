"""The onnxruntime session that runs a bundle's denoiser: provider choice, threads, caches.

onnxruntime is not a hard dependency of collafuse-edge, because a Jetson gets its GPU build
from NVIDIA's own wheels; it is imported here, on first use, with a message that says what to
install when neither build is present.

Example::

    den = OnnxDenoiser(load_bundle("bundle/"), SessionConfig(intra_op_threads=2))
    eps = den(x, np.full(len(x), 42), labels)     # [B,C,H,W] float32
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BATCH_DIM, CLASS_LABELS, EPS, SAMPLE, TIMESTEP, Bundle
from .errors import BundleError, InputError

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
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module (CPU or GPU build), or an ImportError saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return onnxruntime


def default_trt_cache_dir(bundle: Bundle) -> Path:
    """``$XDG_CACHE_HOME/collafuse-edge/tensorrt/<model sha256 prefix>`` (engines are per model)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sha = next(f.sha256 for f in bundle.files if f.path == bundle.model_file.name)
    return base / "collafuse-edge" / "tensorrt" / sha[:16]


@dataclass(frozen=True)
class SessionConfig:
    """How to run the denoiser. The defaults suit a CPU; on a Jetson leave ``providers`` unset."""

    # Execution providers in order of preference, short ("tensorrt", "cuda", "cpu") or full
    # onnxruntime names. None: every available one of TensorRT → CUDA → CPU.
    providers: tuple[str, ...] | None = None
    intra_op_threads: int = 0  # threads inside an operator; 0 = onnxruntime's default (all cores)
    inter_op_threads: int = 1  # the denoiser graph is a chain: parallel operators rarely help
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all", applied at load
    trt_cache_dir: str | None = None  # TensorRT engine + timing cache; None = per-user cache dir
    trt_fp16: bool = False  # let TensorRT build fp16 kernels (Jetson: usually faster)
    trt_max_batch: int = 64  # the largest batch the TensorRT optimisation profile covers
    device_id: int = 0  # the GPU for CUDA/TensorRT

    def __post_init__(self) -> None:
        if self.providers is not None:
            if isinstance(self.providers, str) or not self.providers:
                raise InputError(f"providers must be a non-empty tuple of names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))
            for p in self.providers:
                full_provider_name(p)
        for name in ("intra_op_threads", "inter_op_threads", "device_id"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer ≥ 0, got {v!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}; "
                             f"got {self.graph_optimization!r}")
        if isinstance(self.trt_max_batch, bool) or not isinstance(self.trt_max_batch, int) or self.trt_max_batch < 1:
            raise InputError(f"trt_max_batch must be a positive integer, got {self.trt_max_batch!r}")


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


def _provider_options(provider: str, cfg: SessionConfig, bundle: Bundle) -> dict:
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
        return {"device_id": cfg.device_id}
    return {}


class OnnxDenoiser:
    """ε̂ = model(sample, timestep, class_labels) on an onnxruntime session of a bundle's model.

    Call with ``sample`` ``[B,C,H,W]`` float32, ``timestep`` ``[B]`` int64 and, for a
    conditional bundle, ``class_labels`` ``[B]`` int64; returns ε̂ ``[B,C,H,W]`` float32.
    """

    def __init__(self, bundle: Bundle, config: SessionConfig | None = None):
        ort = import_onnxruntime()
        cfg = config or SessionConfig()
        self.bundle = bundle
        self.config = cfg
        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.intra_op_threads
        so.inter_op_num_threads = cfg.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[cfg.graph_optimization]
        so.log_severity_level = 3  # errors only: provider fallbacks are reported via .providers
        names = choose_providers(cfg.providers, ort.get_available_providers())
        providers = [(p, _provider_options(p, cfg, bundle)) for p in names]
        try:
            self.session = ort.InferenceSession(str(bundle.model_file), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/… types
            raise BundleError(
                f"bundle {bundle.path}: onnxruntime {ort.__version__} could not load "
                f"{bundle.model_file.name}: {e}. The file may be truncated, or need a newer onnxruntime "
                f"(exported with opset {bundle.manifest.get('model', {}).get('opset')})"
            ) from e
        self._check_io()
        self._feeds_labels = bundle.conditional
        self._out = [EPS]
        self._tail = bundle.image_shape

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses (onnxruntime may have dropped some)."""
        return list(self.session.get_providers())

    def _check_io(self) -> None:
        """The model file must have exactly the interface the manifest declares."""
        problems = []
        for kind, declared, actual in (
            ("input", self.bundle.inputs, self.session.get_inputs()),
            ("output", self.bundle.outputs, self.session.get_outputs()),
        ):
            got = {a.name: a for a in actual}
            want = {d.name: d for d in declared}
            if set(got) != set(want):
                problems.append(f"model {kind}s are {sorted(got)} but the manifest declares {sorted(want)}")
                continue
            for name, d in want.items():
                a = got[name]
                if a.type != _ORT_TYPES.get(d.dtype):
                    problems.append(f"{kind} {name!r} is {a.type} in the model, {d.dtype} in the manifest")
                shape = list(a.shape)
                if len(shape) != len(d.shape) or any(
                    (s != BATCH_DIM and s != m) for s, m in zip(d.shape, shape)
                ) or isinstance(shape[0], int):
                    problems.append(f"{kind} {name!r} has shape {shape} in the model, "
                                    f"{list(d.shape)} (dynamic batch) in the manifest")
        if problems:
            raise BundleError(f"bundle {self.bundle.path}: {self.bundle.model_file.name} does not match "
                              f"its manifest: " + "; ".join(problems))

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray | None = None) -> np.ndarray:
        if sample.dtype != np.float32 or sample.shape[1:] != self._tail:
            raise InputError(f"sample must be float32 [B, {', '.join(map(str, self._tail))}], "
                             f"got {sample.dtype} {list(sample.shape)}")
        feeds = {SAMPLE: sample, TIMESTEP: timestep}
        if self._feeds_labels:
            if class_labels is None:
                raise InputError("this bundle is class-conditional: pass class_labels [B] int64")
            feeds[CLASS_LABELS] = class_labels
        return self.session.run(self._out, feeds)[0]
