"""GPU execution providers that cannot start, without a GPU: a stand-in onnxruntime reports the
GPU build's providers, fails TensorRT the way a missing libnvinfer does and drops CUDA the way a
missing libcudart can. With the automatic choice the runtime falls through to the next provider,
says so and keeps stdout clean; a provider asked for by name is a clear error instead; a bad model
stays a bundle error. The real GPU build is exercised by ``benchmarks/edge_gpu.py`` on a GPU."""
from __future__ import annotations

import shutil
import types

import numpy as np
import onnxruntime as real_ort
import pytest
from edge_paths import COND

from collafuse_edge import load_bundle
from collafuse_edge import providers as providers_mod
from collafuse_edge import session as session_mod
from collafuse_edge.errors import BundleError, InputError
from collafuse_edge.session import OnnxDenoiser, SessionConfig

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class _Reporting:
    """A CPU session that reports the providers a GPU build would have started."""

    def __init__(self, sess, started):
        self._sess, self._started = sess, started

    def get_providers(self):
        return list(self._started)

    def __getattr__(self, name):
        return getattr(self._sess, name)


def fake_gpu_ort(trt: str = "raise", cuda: str = "drop", calls: list | None = None):
    """The real onnxruntime, but claiming the GPU build's providers. ``trt``/``cuda``: "raise"
    (the session fails, as with a missing library), "drop" (onnxruntime starts without it)."""
    calls = [] if calls is None else calls

    def InferenceSession(path, sess_options=None, providers=None, enable_fallback=1, **kw):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        calls.append({"providers": names, "enable_fallback": enable_fallback})
        if TRT in names and trt == "raise":
            raise RuntimeError("Failed to load library libonnxruntime_providers_tensorrt.so with error: "
                               "libnvinfer.so.10: cannot open shared object file: No such file or directory")
        if CUDA in names and cuda == "raise":
            raise RuntimeError("Failed to load library libonnxruntime_providers_cuda.so with error: "
                               "libcudart.so.13: cannot open shared object file")
        sess = real_ort.InferenceSession(path, sess_options=sess_options, providers=[CPU])
        started = [n for n in names if not (n == CUDA and cuda == "drop")]
        return _Reporting(sess, started)

    mod = types.SimpleNamespace(**{k: getattr(real_ort, k) for k in dir(real_ort) if not k.startswith("__")})
    mod.__version__ = real_ort.__version__
    mod.get_available_providers = lambda: [TRT, CUDA, CPU]
    mod.InferenceSession = InferenceSession
    mod.preload_dlls = lambda: print("Failed to load libcudnn.so.9: not found")  # speaks on stdout, as the real one
    return mod, calls


@pytest.fixture
def gpu_build(monkeypatch):
    def install(**kw):
        mod, calls = fake_gpu_ort(**kw)
        monkeypatch.setattr(session_mod, "import_onnxruntime", lambda: mod)
        monkeypatch.setattr(providers_mod, "_preloaded", {})
        return calls
    return install


def _run_once(den: OnnxDenoiser) -> np.ndarray:
    c, h, w = den.bundle.image_shape
    x = np.zeros((2, c, h, w), np.float32)
    return den(x, np.array([3, 1]), np.array([0, 1]))


def test_automatic_choice_falls_through_and_keeps_stdout_clean(gpu_build, capsys, caplog):
    calls = gpu_build(trt="raise", cuda="drop")
    den = OnnxDenoiser(load_bundle(COND), SessionConfig())
    assert den.providers == [CPU]
    assert [c["providers"] for c in calls] == [[TRT, CUDA, CPU], [CUDA, CPU]]
    assert all(c["enable_fallback"] == 0 for c in calls)  # onnxruntime's own retry prints and drops CUDA
    assert len(den.provider_notes) == 2
    assert "TensorrtExecutionProvider did not start (Failed to load library" in den.provider_notes[0]
    assert "CUDAExecutionProvider did not start; running on CPUExecutionProvider" in den.provider_notes[1]
    assert "Set providers explicitly" in caplog.text
    assert _run_once(den).shape == (2, 1, 8, 8)
    out = capsys.readouterr()
    assert out.out == ""  # the library preload's chatter never reaches stdout (the CLI writes JSON there)


def test_automatic_choice_uses_cuda_when_tensorrt_fails(gpu_build):
    calls = gpu_build(trt="raise", cuda="ok")
    den = OnnxDenoiser(load_bundle(COND), SessionConfig())
    assert [c["providers"] for c in calls][-1] == [CUDA, CPU]
    assert len(den.provider_notes) == 1  # only TensorRT (the stand-in runs CUDA's share on the CPU)


@pytest.mark.parametrize("asked,trt,cuda", [(("tensorrt",), "raise", "ok"), (("cuda", "cpu"), "ok", "raise"),
                                             (("cuda",), "ok", "drop")])
def test_a_provider_asked_for_by_name_is_never_silently_replaced(gpu_build, asked, trt, cuda):
    gpu_build(trt=trt, cuda=cuda)
    with pytest.raises(InputError) as e:
        OnnxDenoiser(load_bundle(COND), SessionConfig(providers=asked))
    msg = str(e.value)
    assert "could not start" in msg and "cuDNN 9" in msg and "--provider cpu" in msg
    assert "Loading the CUDA libraries said: Failed to load libcudnn.so.9" in msg


def test_a_damaged_model_stays_a_bundle_error_under_a_gpu_provider(gpu_build, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(COND, b)
    bundle = load_bundle(b)
    model = bundle.model_file
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # after the hash check
    gpu_build(trt="ok", cuda="raise")
    with pytest.raises(BundleError, match="could not load"):
        OnnxDenoiser(bundle, SessionConfig(providers=("cuda",)))


def test_preload_runs_once_and_only_for_gpu_providers(gpu_build, monkeypatch):
    gpu_build(trt="ok", cuda="ok")
    n = []
    real = session_mod.preload_gpu_libraries
    monkeypatch.setattr(session_mod, "preload_gpu_libraries", lambda ort: n.append(1) or real(ort))
    OnnxDenoiser(load_bundle(COND), SessionConfig(providers=("cpu",), graph_cache="off"))
    assert n == []
    OnnxDenoiser(load_bundle(COND), SessionConfig(providers=("cuda",)))
    OnnxDenoiser(load_bundle(COND), SessionConfig(providers=("cuda",)))
    assert providers_mod._preloaded["done"].startswith("Failed to load libcudnn")


def test_cuda_tf32_must_be_a_bool():
    with pytest.raises(InputError, match="cuda_tf32 must be True or False"):
        SessionConfig(cuda_tf32="yes")


def test_cuda_graph_bookkeeping_matches_plain_runs():
    """The replay path's buffers per batch size, checked on the CPU (same IO binding API): sizes
    interleaved, contents changing between calls, and a size past the limit run uncaptured."""
    from collafuse_edge.session import CudaGraphs

    bundle = load_bundle(COND)
    sess = real_ort.InferenceSession(str(bundle.model_file), providers=[CPU])
    graphs = CudaGraphs(real_ort, sess, 0, bundle.image_shape, max_graphs=2, device_type="cpu")
    rng = np.random.default_rng(0)
    for b in (1, 3, 1, 5, 3, 1, 5):
        x = rng.standard_normal((b, *bundle.image_shape)).astype(np.float32)
        feeds = {"sample": x, "timestep": rng.integers(0, 20, b), "class_labels": rng.integers(0, 10, b).astype(np.int32)}
        want = sess.run(["eps"], {**feeds, "class_labels": feeds["class_labels"].astype(np.int64)})[0]
        np.testing.assert_array_equal(graphs(feeds), want)
    assert graphs.batch_sizes == [1, 3]  # 5 ran without a graph


def test_cuda_graph_without_cuda_is_noted(caplog):
    den = OnnxDenoiser(load_bundle(COND), SessionConfig(providers=("cpu",), cuda_graph=True, graph_cache="off"))
    assert den.provider_notes == ["cuda_graph applies to the CUDA provider only; running on CPUExecutionProvider "
                                  "without it"]
    assert _run_once(den).shape == (2, 1, 8, 8)


def test_cuda_graph_is_asked_for_in_the_cuda_options():
    from collafuse_edge.session import _provider_options

    b = load_bundle(COND)
    assert _provider_options(CUDA, SessionConfig(cuda_graph=True), b)["enable_cuda_graph"] == 1
    assert "enable_cuda_graph" not in _provider_options(CUDA, SessionConfig(), b)
    with pytest.raises(InputError, match="cuda_graph_batches"):
        SessionConfig(cuda_graph_batches=0)


def test_onnxruntime_source_locations_are_cut_from_messages():
    from collafuse_edge.session import _first_line

    e = RuntimeError("/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::python::"
                     "RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::ProviderOptions&) "
                     "Please install TensorRT libraries\nmore")
    assert _first_line(e) == "Please install TensorRT libraries"


def test_the_split_modules_stay_importable_from_session():
    """providers, graph_cache and cuda_graphs hold the pieces; session re-exports them unchanged."""
    from collafuse_edge import cuda_graphs, graph_cache

    for mod in (providers_mod, graph_cache, cuda_graphs):
        for name in mod.__all__:
            if hasattr(session_mod, name):
                assert getattr(session_mod, name) is getattr(mod, name), name
    for name in session_mod.__all__:
        assert hasattr(session_mod, name), name
    assert {"CudaGraphs", "GraphCache", "choose_providers", "import_onnxruntime", "preload_gpu_libraries",
            "default_trt_cache_dir", "INSTALL_HINT", "GRAPH_OPTIMIZATIONS"} <= set(session_mod.__all__)
