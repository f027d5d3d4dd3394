"""The onnxruntime session that runs a bundle's denoiser: :class:`SessionConfig` (providers,
threads, caches) and :class:`OnnxDenoiser`.

The parts it is built from live beside it: :mod:`.providers` (importing onnxruntime, the
TensorRT → CUDA → CPU walk, GPU libraries), :mod:`.graph_cache` (the CPU-optimised graph and the
TensorRT engine folder kept between starts) and :mod:`.cuda_graphs`. Their public names stay
importable from here.

Example::

    den = OnnxDenoiser(load_bundle("bundle/"), SessionConfig(intra_op_threads=2))
    eps = den(x, np.full(len(x), 42), labels)     # [B,C,H,W] float32
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BATCH_DIM, CLASS_LABELS, EPS, SAMPLE, TIMESTEP, Bundle
from .cuda_graphs import CudaGraphs
from .errors import BundleError, InputError
from .graph_cache import GraphCache, default_trt_cache_dir, trt_engine_files
from .graph_cache import cache_base as _cache_base
from .providers import (GPU_PROVIDERS, INSTALL_HINT, PROVIDER_NAMES, choose_providers, full_provider_name, gpu_hint,
                        import_onnxruntime, preload_gpu_libraries)
from .providers import first_line as _first_line
from .providers import new_session as _new_session
from .providers import provider_options as _provider_options
from .validation import check_int

GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}

log = logging.getLogger("collafuse_edge")


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
    # CUDA provider: allow TF32 tensor-core maths in convolutions and matmuls. Off by default so
    # an fp32 bundle gives fp32 results (≤ 1e-4 parity); on, it trades ~1e-3 error for speed on
    # large batches.
    cuda_tf32: bool = False
    # CUDA provider: capture each batch size's model call as a CUDA graph and replay it (inputs
    # copied into fixed device buffers). About 2× faster calls at small batches on an H200; each
    # new batch size costs one capture, and at most ``cuda_graph_batches`` sizes are kept (others
    # run without a graph).
    cuda_graph: bool = False
    cuda_graph_batches: int = 8
    # Where the CPU-optimised graph is kept between starts: "auto" (per-user cache dir), "off",
    # or a directory. Used with the CPU provider alone and graph_optimization other than "disable".
    graph_cache: str = "auto"

    def __post_init__(self) -> None:
        if self.providers is not None:
            if isinstance(self.providers, str) or not self.providers:
                raise InputError(f"providers must be a non-empty tuple of names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))
            for p in self.providers:
                full_provider_name(p)
        for name in ("intra_op_threads", "inter_op_threads", "device_id"):
            check_int(name, getattr(self, name), low=0)
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}; "
                             f"got {self.graph_optimization!r}")
        if not isinstance(self.graph_cache, str) or not self.graph_cache:
            raise InputError(f"graph_cache must be 'auto', 'off' or a directory, got {self.graph_cache!r}")
        for name in ("trt_fp16", "cuda_tf32", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int("cuda_graph_batches", self.cuda_graph_batches, low=1)
        check_int("trt_max_batch", self.trt_max_batch, low=1)


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
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[cfg.graph_optimization]
        so.log_severity_level = 3  # errors only: provider fallbacks are reported via .providers
        names = choose_providers(cfg.providers, ort.get_available_providers())
        providers = [(p, _provider_options(p, cfg, bundle)) for p in names]
        self.trt_cache_dir: Path | None = None
        self.trt_first_build = False  # TensorRT had no engine cached for this model: it builds them now
        if "TensorrtExecutionProvider" in names:
            self.trt_cache_dir = Path(dict(providers)["TensorrtExecutionProvider"]["trt_engine_cache_path"])
            self.trt_first_build = not trt_engine_files(self.trt_cache_dir)
            if self.trt_first_build:
                log.warning("TensorRT builds its engines for %s now (first use of this model with these options): "
                            "this can take minutes with no other output. They are kept in %s and reused by later "
                            "starts; collafuse-edge warmup --bundle %s does this ahead of time.",
                            bundle.model_file.name, self.trt_cache_dir, bundle.path)
        cache = None
        if cfg.graph_cache != "off" and names == ["CPUExecutionProvider"] and cfg.graph_optimization != "disable":
            root = _cache_base() / "ort-optimized" if cfg.graph_cache == "auto" else Path(cfg.graph_cache)
            cache = GraphCache(root, bundle, ort.__version__, cfg.graph_optimization)
        self.graph_cache_hit = False
        self.session = None
        self.provider_notes: list[str] = []  # GPU providers that were asked for but did not start
        cached = cache.lookup() if cache is not None else None
        if cached is not None:
            so.graph_optimization_level = levels["disable"]
            try:
                self.session = _new_session(ort, cached, so, providers)
                self.graph_cache_hit = True
            except Exception as e:  # a stale or foreign entry: fall back to the bundle's model
                log.info("optimised-graph cache entry %s did not load (%s); rebuilding it", cached.name, e)
                so.graph_optimization_level = levels[cfg.graph_optimization]
        if self.session is None:
            tmp = cache.temp_target() if cache is not None else None
            if tmp is not None:
                so.optimized_model_filepath = str(tmp)
            try:
                self.session = self._open_with_gpu_fallback(ort, so, providers)
            except InputError:
                raise
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/… types
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                raise BundleError(
                    f"bundle {bundle.path}: onnxruntime {ort.__version__} could not load "
                    f"{bundle.model_file.name}: {e}. The file may be truncated, or need a newer onnxruntime "
                    f"(exported with opset {bundle.manifest.get('model', {}).get('opset')})"
                ) from e
            if tmp is not None:
                cache.commit(tmp)
        self._check_io()
        self._feeds_labels = bundle.conditional
        self._out = [EPS]
        self._tail = bundle.image_shape
        self._graphs = None
        if cfg.cuda_graph:
            if self.providers[0] == "CUDAExecutionProvider":
                self._graphs = CudaGraphs(ort, self.session, cfg.device_id, self._tail, cfg.cuda_graph_batches)
            else:
                self._note(f"cuda_graph applies to the CUDA provider only; running on {self.providers[0]} without it")

    def _open_with_gpu_fallback(self, ort: Any, so: Any, providers: list[tuple[str, dict]]) -> Any:
        """The session on the first providers that start. A GPU provider that onnxruntime cannot
        start (libraries missing, no device) is an error when it was asked for by name; with the
        automatic choice it is skipped, logged and noted in ``provider_notes``. onnxruntime's own
        fallback is off: it prints to stdout and retries on the CPU alone, dropping CUDA too."""
        explicit = self.config.providers is not None
        preload_text = preload_gpu_libraries(ort) if any(p in GPU_PROVIDERS for p, _ in providers) else ""
        while True:
            try:
                session = _new_session(ort, self.bundle.model_file, so, providers)
                break
            except Exception as e:
                first = providers[0][0]
                if first not in GPU_PROVIDERS:
                    raise  # the CPU provider failed: the model file's problem (a BundleError above)
                if explicit:
                    # a bad model or a provider that cannot start? the CPU provider alone tells:
                    # if it fails too, its error (the model's) is the one raised
                    _new_session(ort, self.bundle.model_file, so, [("CPUExecutionProvider", {})])
                    gpus = [p for p, _ in providers if p in GPU_PROVIDERS]
                    raise InputError(self._gpu_failure(ort, gpus, _first_line(e), preload_text)) from e
                rest = providers[1:] or [("CPUExecutionProvider", {})]
                self._note(f"{first} did not start ({_first_line(e)}); trying {rest[0][0]}")
                providers = rest
        actual = session.get_providers()
        dropped = [p for p, _ in providers if p not in actual]
        if dropped:  # onnxruntime may skip a provider whose library does not load, without raising
            if explicit:
                raise InputError(self._gpu_failure(ort, dropped, "onnxruntime skipped it at session start",
                                                   preload_text))
            self._note(f"{', '.join(dropped)} did not start; running on {', '.join(actual)}")
        return session

    def _note(self, text: str) -> None:
        self.provider_notes.append(text)
        log.warning("bundle %s: %s. %s", self.bundle.path, text, "Set providers explicitly to make this an error.")

    @staticmethod
    def _gpu_failure(ort: Any, names: list[str], why: str, preload_text: str) -> str:
        msg = f"execution provider(s) {', '.join(names)} could not start ({why}). {gpu_hint(ort)}"
        if preload_text:
            msg += f". Loading the CUDA libraries said: {preload_text.splitlines()[0][:300]}"
        return msg

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
        try:
            out = self._graphs(feeds) if self._graphs is not None else self.session.run(self._out, feeds)[0]
        except Exception as e:  # onnxruntime's own Fail/RuntimeException: a model that loads but cannot run
            raise BundleError(f"bundle {self.bundle.path}: onnxruntime failed to run {self.bundle.model_file.name} "
                              f"on a batch of {sample.shape[0]}: {e}. The model file may be damaged; re-download "
                              "or re-export the bundle") from e
        if out.shape != sample.shape:
            raise BundleError(f"bundle {self.bundle.path}: the model returned shape {list(out.shape)} for a "
                              f"sample of shape {list(sample.shape)}; the model file does not match its manifest")
        return out


__all__ = ["GPU_PROVIDERS", "GRAPH_OPTIMIZATIONS", "INSTALL_HINT", "PROVIDER_NAMES", "CudaGraphs", "GraphCache",
           "OnnxDenoiser", "SessionConfig", "choose_providers", "default_trt_cache_dir", "full_provider_name",
           "gpu_hint", "import_onnxruntime", "preload_gpu_libraries"]
