"""The optimised-graph cache: saved once, loaded on later starts, never trusted blindly."""
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from collafuse_edge import load_bundle
from collafuse_edge.errors import InputError
from collafuse_edge.session import OnnxDenoiser
from collafuse_edge.session import SessionConfig as _SessionConfig


def SessionConfig(**kw):
    """The cache serves the CPU provider alone: pinned, so a GPU build's automatic choice (CUDA,
    which the cache does not apply to) does not change what these tests test."""
    kw.setdefault("providers", ("cpu",))
    return _SessionConfig(**kw)


def _feeds(bundle, b=3):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, *bundle.image_shape)).astype(np.float32)
    t = np.array([0, 7, 19][:b], dtype=np.int64)
    lab = np.arange(b, dtype=np.int64) if bundle.conditional else None
    return x, t, lab


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_miss_then_hit_gives_the_same_numbers(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "gc"
    cold = OnnxDenoiser(b, SessionConfig(intra_op_threads=1, graph_cache=str(root)))
    assert not cold.graph_cache_hit
    names = _entries(root)
    assert len(names) == 2 and any(n.endswith(".onnx") for n in names) and any(n.endswith(".sha256") for n in names)
    warm = OnnxDenoiser(b, SessionConfig(intra_op_threads=1, graph_cache=str(root)))
    assert warm.graph_cache_hit
    plain = OnnxDenoiser(b, SessionConfig(intra_op_threads=1, graph_cache="off"))
    x, t, lab = _feeds(b)
    np.testing.assert_allclose(warm(x, t, lab), plain(x, t, lab), rtol=0, atol=1e-6)
    np.testing.assert_allclose(cold(x, t, lab), plain(x, t, lab), rtol=0, atol=1e-6)


def test_a_corrupted_entry_is_rebuilt(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "gc"
    OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    model = next(p for p in root.iterdir() if p.suffix == ".onnx")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # truncated
    again = OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    assert not again.graph_cache_hit  # the hash check caught it
    assert model.read_bytes() == data or len(model.read_bytes()) > len(data) // 2  # rebuilt
    assert OnnxDenoiser(b, SessionConfig(graph_cache=str(root))).graph_cache_hit


def test_an_entry_with_a_matching_hash_that_fails_to_load_is_rebuilt(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "gc"
    OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    model = next(p for p in root.iterdir() if p.suffix == ".onnx")
    sidecar = model.with_suffix(".sha256")
    model.write_bytes(b"not an onnx model")
    import hashlib

    sidecar.write_text(hashlib.sha256(b"not an onnx model").hexdigest())
    den = OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    assert not den.graph_cache_hit
    x, t, lab = _feeds(b)
    assert den(x, t, lab).shape == x.shape
    assert OnnxDenoiser(b, SessionConfig(graph_cache=str(root))).graph_cache_hit


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_cache_only_costs_the_speed_up(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        den = OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
        assert not den.graph_cache_hit and _entries(root) == []
    finally:
        root.chmod(stat.S_IRWXU)


def test_a_cache_path_that_is_a_file_only_costs_the_speed_up(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    den = OnnxDenoiser(b, SessionConfig(graph_cache=str(blocker / "sub")))
    x, t, lab = _feeds(b)
    assert den(x, t, lab).shape == x.shape and not den.graph_cache_hit


def test_off_and_disabled_optimisation_write_nothing(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "gc"
    OnnxDenoiser(b, SessionConfig(graph_cache="off"))
    OnnxDenoiser(b, SessionConfig(graph_cache=str(root), graph_optimization="disable"))
    assert _entries(root) == []


def test_the_key_follows_the_model_file(cond_bundle, tmp_path):
    b = load_bundle(cond_bundle)
    root = tmp_path / "gc"
    OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    os.utime(b.model_file, ns=(1, 1))  # a different file as far as the key is concerned
    den = OnnxDenoiser(b, SessionConfig(graph_cache=str(root)))
    assert not den.graph_cache_hit and len(_entries(root)) == 4


def test_bad_graph_cache_value_is_refused():
    with pytest.raises(InputError, match="graph_cache"):
        SessionConfig(graph_cache="")
