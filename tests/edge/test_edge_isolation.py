"""collafuse-edge stands alone: no torch or diffusers, even lazily; clear messages when
onnxruntime or Pillow are missing; images written without torch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from edge_paths import COND, LOCAL

from collafuse_edge.images import PNG_HINT, make_grid, save_images, to_uint8
from collafuse_edge.session import INSTALL_HINT, SessionConfig, choose_providers


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_runs_with_torch_and_diffusers_blocked():
    """Every submodule imports, and the sampler runs on a bundle, with torch, diffusers and onnx
    unimportable; none of them is even attempted (a blocked import would raise)."""
    r = _run(f"""
        import sys
        for name in ("torch", "diffusers", "onnx", "collafuse"):
            sys.modules[name] = None  # any import of these raises ImportError
        import importlib, pkgutil
        import collafuse_edge
        mods = [m.name for m in pkgutil.iter_modules(collafuse_edge.__path__)]
        for m in mods:
            importlib.import_module("collafuse_edge." + m)
        from collafuse_edge import EdgeRuntime, SamplerConfig
        from collafuse_edge.cli import main
        rt = EdgeRuntime.open({str(LOCAL)!r})
        x = rt.generate_local(2, seed=0, sampler=SamplerConfig("ddim", 5))
        assert x.shape == (2, 3, 8, 8)
        assert main(["info", "--bundle", {str(COND)!r}]) == 0
        loaded = [n for n in ("torch", "diffusers", "onnx") if sys.modules.get(n) is not None]
        assert not loaded, loaded
        print("OK", len(mods))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2] == "OK" and int(r.stdout.split()[-1]) >= 10


def test_clear_message_without_onnxruntime():
    r = _run(f"""
        import sys
        sys.modules["onnxruntime"] = None
        from collafuse_edge import EdgeRuntime, load_bundle
        load_bundle({str(COND)!r})  # reading and verifying a bundle needs no onnxruntime
        try:
            EdgeRuntime.open({str(COND)!r})
        except ImportError as e:
            print(e)
        from collafuse_edge.cli import main
        sys.exit(main(["generate", "--bundle", {str(LOCAL)!r}, "--local", "-n", "1", "--out", "x.npy"]))
    """)
    assert r.returncode == 1
    assert INSTALL_HINT in r.stdout
    assert "collafuse-edge[cpu]" in r.stderr and "Jetson" in r.stderr


def test_png_needs_pillow_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"collafuse-edge\[png\]"):
        save_images(tmp_path / "x.png", np.zeros((1, 1, 8, 8), np.float32))
    save_images(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))  # .npy needs nothing
    assert PNG_HINT


def test_image_conversion():
    x = np.array([-1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 2, 2)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 255]
    grid = make_grid(np.zeros((5, 3, 4, 4), np.float32), pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)


def test_provider_choice():
    assert choose_providers(None, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(None, avail[::-1]) == avail  # TensorRT → CUDA → CPU
    assert choose_providers(("cuda", "cpu"), avail) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="not available"):
        choose_providers(("cuda",), ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="unknown execution provider 'npu'"):
        SessionConfig(providers=("npu",))
    with pytest.raises(ValueError, match="intra_op_threads"):
        SessionConfig(intra_op_threads=-1)


def test_tensorrt_options_cover_the_dynamic_batch_and_cache(tmp_path):
    from collafuse_edge import load_bundle
    from collafuse_edge.session import _provider_options, default_trt_cache_dir

    b = load_bundle(COND)
    cache = tmp_path / "trt"
    opts = _provider_options("TensorrtExecutionProvider", SessionConfig(trt_cache_dir=str(cache), trt_max_batch=32), b)
    assert cache.is_dir() and opts["trt_engine_cache_path"] == str(cache) == opts["trt_timing_cache_path"]
    assert opts["trt_profile_min_shapes"] == "sample:1x1x8x8,timestep:1,class_labels:1"
    assert opts["trt_profile_max_shapes"] == "sample:32x1x8x8,timestep:32,class_labels:32"
    assert opts["trt_engine_cache_enable"] and not opts["trt_int8_enable"]
    sha = b.files[0].sha256
    assert default_trt_cache_dir(b).name == sha[:16]  # engines are per model file
    assert _provider_options("CUDAExecutionProvider", SessionConfig(device_id=1), b) == {"device_id": 1, "use_tf32": 0}
    assert _provider_options("CUDAExecutionProvider", SessionConfig(cuda_tf32=True), b)["use_tf32"] == 1
