"""The onnxruntime session that runs a bundle's denoiser: provider choice, threads, caches.

onnxruntime is not a hard dependency of collafuse-edge, because a Jetson gets its GPU build
from NVIDIA's own wheels; it is imported here, on first use, with a message that says what to
install when neither build is present.

Example::

    den = OnnxDenoiser(load_bundle("bundle/"), SessionConfig(intra_op_threads=2))
    eps = den(x, np.full(len(x), 42), labels)     # [B,C,H,W] float32
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BATCH_DIM, CLASS_LABELS, EPS, SAMPLE, TIMESTEP, Bundle, sha256_file
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
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module (CPU or GPU build), or an ImportError saying what to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return onnxruntime


log = logging.getLogger("collafuse_edge")


def _cache_base() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "collafuse-edge"


def _model_sha(bundle: Bundle) -> str:
    return next(f.sha256 for f in bundle.files if f.path == bundle.model_file.name)


def default_trt_cache_dir(bundle: Bundle) -> Path:
    """``$XDG_CACHE_HOME/collafuse-edge/tensorrt/<model sha256 prefix>`` (engines are per model)."""
    return _cache_base() / "tensorrt" / _model_sha(bundle)[:16]


def _cpu_fingerprint() -> str:
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
        key = hashlib.sha256("|".join([_model_sha(bundle), f"{st.st_size}:{st.st_mtime_ns}", ort_version,
                                       level, _cpu_fingerprint()]).encode()).hexdigest()[:24]
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
        """Move the saved graph into place, then its sidecar; leaves no temp file behind."""
        side = None
        try:
            digest = sha256_file(tmp)
            fd, side = tempfile.mkstemp(prefix=".tmp-", suffix=".sha256", dir=self.root)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(digest + "\n")
            os.replace(tmp, self.model)  # the model first: a sidecar never names a missing file
            os.replace(side, self.sidecar)
        except OSError as e:
            log.info("could not save the optimised graph to %s (%s)", self.root, e)
        finally:
            for leftover in (tmp, side):
                if leftover is not None:
                    Path(leftover).unlink(missing_ok=True)


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
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} must be an integer ≥ 0, got {v!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise InputError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}; "
                             f"got {self.graph_optimization!r}")
        if not isinstance(self.graph_cache, str) or not self.graph_cache:
            raise InputError(f"graph_cache must be 'auto', 'off' or a directory, got {self.graph_cache!r}")
        for name in ("trt_fp16", "cuda_tf32", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.cuda_graph_batches, bool) or not isinstance(self.cuda_graph_batches, int) \
                or self.cuda_graph_batches < 1:
            raise InputError(f"cuda_graph_batches must be a positive integer, got {self.cuda_graph_batches!r}")
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


class CudaGraphs:
    """onnxruntime's CUDA-graph mode behind the plain call: one captured graph per batch size
    (run option ``gpu_graph_id``), each on its own fixed device buffers bound through IO binding.
    A call copies the inputs into the buffers, replays (the first call of a size is a regular run,
    the second captures), and copies ε̂ back. Sizes beyond ``max_graphs`` run uncaptured
    (``gpu_graph_id`` -1): a graph replays on the addresses it was captured with, so a plain
    ``session.run`` on fresh buffers must never be captured."""

    def __init__(self, ort: Any, session: Any, device_id: int, tail: tuple, max_graphs: int,
                 device_type: str = "cuda"):
        self._ort, self._session, self._device, self._tail = ort, session, device_id, tail
        self._type = device_type  # "cpu" in the tests, which check the bookkeeping without a GPU
        self._max = max_graphs
        self._graphs: dict[int, tuple] = {}
        self._plain = ort.RunOptions()
        self._plain.add_run_config_entry("gpu_graph_id", "-1")

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        ort = self._ort
        # the buffers' types are fixed at capture: sample float32, timestep and labels int64
        feeds = {n: np.ascontiguousarray(v, dtype=np.float32 if n == SAMPLE else np.int64) for n, v in feeds.items()}
        b = feeds[SAMPLE].shape[0]
        g = self._graphs.get(b)
        if g is None:
            if len(self._graphs) >= self._max:
                return self._session.run([EPS], feeds, self._plain)[0]
            bufs = {n: ort.OrtValue.ortvalue_from_numpy(v, self._type, self._device) for n, v in feeds.items()}
            out = ort.OrtValue.ortvalue_from_shape_and_type([b, *self._tail], np.float32, self._type, self._device)
            io = self._session.io_binding()
            for n, v in bufs.items():
                io.bind_ortvalue_input(n, v)
            io.bind_ortvalue_output(EPS, out)
            opts = ort.RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
            self._graphs[b] = (bufs, out, io, opts)  # fresh buffers: they already hold this call's inputs
        else:
            bufs, out, io, opts = g
            for n, v in feeds.items():
                bufs[n].update_inplace(v)
        self._session.run_with_iobinding(io, opts)
        return out.numpy()


def _new_session(ort: Any, path: Path, so: Any, providers: list) -> Any:
    # enable_fallback=0: onnxruntime's own retry prints to stdout and drops to the CPU alone
    return ort.InferenceSession(str(path), sess_options=so, providers=providers, enable_fallback=0)


_SOURCE_PREFIX = re.compile(r"^\S+\.(?:cc|cpp|h):\d+ [^(]*\([^)]*\) ")


def _first_line(e: Exception) -> str:
    """The first line of an onnxruntime error, without its C++ source location."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return _SOURCE_PREFIX.sub("", text.splitlines()[0])[:300]
