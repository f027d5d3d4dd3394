"""Fuzzing of the file formats the edge runtime reads from others: the ``.npy`` tensor
wire format, the ``X-Collafuse-Shape`` header, bundle manifests and bundle ONNX files.

Every input — truncated, bit-flipped, wrong dtype, lying shape header, NaN/Inf, a header that
declares 10^12 elements, bad JSON, wrong types — ends in a value that satisfies the contract or
in exactly one of the runtime's own errors (ProtocolError, BundleError), with memory bounded by
the input's size. Torch-free: runs in the edge-only venv (hypothesis is installed there).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from edge_paths import COND, LOCAL  # noqa: E402

from collafuse_edge import BundleError, EdgeRuntime, load_bundle  # noqa: E402
from collafuse_edge.bundle import parse_manifest  # noqa: E402
from collafuse_edge.errors import ProtocolError  # noqa: E402
from collafuse_edge.protocol import ALLOWED_DTYPES, decode_tensor, encode_tensor, parse_shape  # noqa: E402

# Examples per property; the long run: COLLAFUSE_FUZZ_EXAMPLES=5000 pytest tests/edge/test_fuzz_formats.py
# (an environment variable, not the `slow` mark: the edge-alone run has no pytest config to register it).
EXAMPLES = int(os.environ.get("COLLAFUSE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------------------
# .npy tensors


def npy_header(descr: str, shape_text: str, fortran: str = "False", version: tuple[int, int] = (1, 0),
               raw_dict: str | None = None) -> bytes:
    """Magic + header of a ``.npy`` file, written by hand so it can lie freely."""
    text = raw_dict if raw_dict is not None else \
        f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    body = text.encode("latin1", "replace")
    if version[0] == 1:
        pad = (64 - (10 + len(body) + 1) % 64) % 64
        body = body + b" " * pad + b"\n"
        return b"\x93NUMPY" + bytes(version) + len(body).to_bytes(2, "little") + body
    pad = (64 - (12 + len(body) + 1) % 64) % 64
    body = body + b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes(version) + len(body).to_bytes(4, "little") + body


DESCRS = ["<f4"] * 6 + ["<i8", "<f2", ">f4", "<f2", "<f8", "<i8", ">i8", "|u1", "|b1", "<c8", "|V4", "<U3", "|O", "<M8[s]",
          "f4", "float32", "zz"]
shape_dims = st.integers(0, 6) | st.sampled_from([10**6, 10**12, 2**62, 2**63, 2**64 + 1, -1])


@st.composite
def npy_payloads(draw):
    """(bytes, what the header declares) — mostly consistent, often broken."""
    kind = draw(st.sampled_from(["consistent"] * 10 + ["lying_shape", "giant", "weird_shape", "raw_dict",
                                                     "truncate", "flip", "extend", "random"]))
    descr = draw(st.sampled_from(DESCRS))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=5)))
    fortran = draw(st.sampled_from(["False"] * 10 + ["True", "1", "None"]))
    version = draw(st.sampled_from([(1, 0)] * 4 + [(2, 0), (3, 0), (0, 9), (255, 255)]))
    try:
        itemsize = np.dtype(descr).itemsize
    except TypeError:
        itemsize = 4
    values = np.random.default_rng(len(shape)).standard_normal(math.prod(shape))
    special = draw(st.sampled_from([None] * 3 + [np.nan, np.inf, -np.inf, 1e300]))
    if special is not None and values.size:
        values[draw(st.integers(0, values.size - 1))] = special
    try:
        with np.errstate(all="ignore"):
            payload = values.astype(np.dtype(descr)).tobytes()
    except (TypeError, ValueError):
        payload = b"\0" * (math.prod(shape) * itemsize)
    shape_text = repr(shape)
    if kind == "lying_shape":
        shape_text = repr(tuple(d + draw(st.integers(1, 3)) for d in shape) or (1,))
    elif kind == "giant":
        shape_text = repr((draw(st.sampled_from([10**12, 2**62, 10**6])), *shape[1:]))
    elif kind == "weird_shape":
        shape_text = draw(st.sampled_from(["(-1,)", "(1.5,)", "('a',)", "[1, 2]", "(True,)", "()", "(1,) * 3",
                                           "((1,),)", "(" * 50 + ")" * 50, "(10**1000,)", "None"]))
    raw_dict = None
    if kind == "raw_dict":
        raw_dict = draw(st.sampled_from(["{}", "[]", "{'descr': '<f4'}", "__import__('os')", "{'descr': '<f4', "
                                         "'fortran_order': False, 'shape': (1,), 'extra': 1}", "x" * 2000])
                        | st.text(max_size=60))
    data = npy_header(descr, shape_text, fortran, version, raw_dict) + payload
    if kind == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=40))
    elif kind == "random":
        data = draw(st.sampled_from([b"", b"\x93NUMPY"])) + draw(st.binary(max_size=300))
    return data


def _bounded_decode(data: bytes, **kw):
    """decode_tensor under tracemalloc: the peak must stay within a few copies of the input."""
    tracemalloc.start()
    try:
        try:
            out = decode_tensor(data, **kw)
        except ProtocolError as e:
            out = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + 2**20, f"decoding {len(data)} bytes allocated {peak} bytes"
    return out


@FUZZ
@given(data=npy_payloads(),
       constraints=st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["float32", "int64"]),
                                                       "ndim": st.integers(0, 4),
                                                       "shape_tail": st.sampled_from([(2,), (1, 2), ()]),
                                                       "require_finite": st.booleans()}))
def test_decode_tensor_fuzz(data, constraints):
    out = _bounded_decode(data, **constraints)
    event("refused" if isinstance(out, ProtocolError) else "decoded")
    if isinstance(out, ProtocolError):
        assert str(out)
        return
    assert isinstance(out, np.ndarray) and out.dtype.name in ALLOWED_DTYPES and out.dtype.isnative
    assert out.flags.c_contiguous and out.flags.owndata
    if "dtype" in constraints:
        assert out.dtype.name == constraints["dtype"]
    if "ndim" in constraints:
        assert out.ndim == constraints["ndim"]
    tail = constraints.get("shape_tail")
    if tail:
        assert out.shape[len(out.shape) - len(tail):] == tail
    if constraints.get("require_finite", True) and out.dtype.kind == "f":
        assert np.all(np.isfinite(out))


def test_decode_tensor_refuses_a_giant_declared_shape_before_allocating():
    for shape in ("(1000000000000,)", "(1000000, 1000000)", "(4611686018427387904, 4)", "(10**1000,)"):
        data = npy_header("<f4", shape) + b"\0" * 64
        out = _bounded_decode(data, max_bytes=2**30)
        assert isinstance(out, ProtocolError), shape


@pytest.mark.parametrize("shape", ["(0, 9223372036854775807)", "(0, 18446744073709551617)", "(True, 4)",
                                   "(0, 2147483647, 2147483647, 2147483647)"])
def test_decode_tensor_refuses_absurd_dims_of_an_empty_tensor(shape):
    """Regression (long fuzz run): 0 elements, so the byte count matched, but numpy could not
    build the shape: ValueError "array is too big" / TypeError escaped instead of ProtocolError."""
    with pytest.raises(ProtocolError, match="invalid tensor shape"):
        decode_tensor(npy_header("<f4", shape), require_finite=False)


def test_decode_tensor_returns_native_byte_order():
    """Regression: a big-endian '>f4' upload came back big-endian (its dtype name is float32 too),
    which torch.from_numpy and onnxruntime refuse."""
    x = np.arange(6, dtype=">f4").reshape(1, 6)
    out = decode_tensor(npy_header(">f4", "(1, 6)") + x.tobytes())
    assert out.dtype == np.dtype("float32") and out.dtype.isnative
    np.testing.assert_array_equal(out, x.astype(np.float32))


@FUZZ
@given(arr=st.sampled_from(ALLOWED_DTYPES).flatmap(
    lambda dt: st.lists(st.integers(0, 4), max_size=4).map(
        lambda shape: np.random.default_rng(len(shape)).standard_normal(math.prod(shape))
        .astype(dt).reshape(shape))))
def test_encode_decode_round_trip(arr):
    np.testing.assert_array_equal(decode_tensor(encode_tensor(arr)), arr)


@FUZZ
@given(text=st.text(max_size=40) | st.lists(st.integers(-3, 2**70), max_size=5).map(lambda v: ",".join(map(str, v)))
       | st.sampled_from(["9" * 5000, "1,,2", " 1 , 2 ", "١,٢", "1_0", "0x10", "", ","]))
def test_parse_shape_fuzz(text):
    try:
        out = parse_shape(text)
    except ProtocolError:
        return
    assert isinstance(out, tuple) and all(isinstance(s, int) and s >= 0 for s in out)


# ---------------------------------------------------------------------------------------------
# bundle manifests

BASE = json.loads((COND / "manifest.json").read_text())
BASE_LOCAL = json.loads((LOCAL / "manifest.json").read_text())

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=12) | st.sampled_from([0, 1, -1, 1.0, 0.5, "batch", "", 10**400]))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=12)


def _paths(doc, prefix=()):
    """Every (nested) key path in a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:6]):
            out += _paths(v, prefix + (i,))
    return out


PATHS = sorted(set(_paths(BASE) + _paths(BASE_LOCAL)), key=str)


@st.composite
def mutated_manifests(draw):
    doc = copy.deepcopy(draw(st.sampled_from([BASE, BASE_LOCAL])))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            op = draw(st.sampled_from(["set", "set", "delete", "bool", "stringify", "negate", "float"]))
            key = path[-1]
            if op == "delete":
                del parent[key]
            elif op == "bool":
                parent[key] = draw(st.booleans())
            elif op == "stringify":
                parent[key] = str(parent[key])
            elif op == "negate" and isinstance(parent[key], (int, float)):
                parent[key] = -parent[key]
            elif op == "float" and isinstance(parent[key], int):
                parent[key] = parent[key] + draw(st.sampled_from([0.0, 0.5, math.inf, math.nan]))
            else:
                parent[key] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def _check_loaded(fields: dict) -> None:
    c, h, w = fields["image_shape"]
    assert min(c, h, w) >= 1
    assert 1 <= fields["client_levels"] <= fields["schedule"].T
    assert fields["handoff_level"] == fields["client_levels"] - 1
    assert 0.0 < fields["cut_ratio"] <= 1.0
    assert np.all(np.isfinite(fields["schedule"].betas))
    assert math.isfinite(fields["schedule"].clip_sample_range) and fields["schedule"].clip_sample_range > 0


@FUZZ
@given(doc=mutated_manifests() | json_values)
def test_parse_manifest_fuzz(doc):
    try:
        fields = parse_manifest(doc, Path("fuzz"))
    except BundleError as e:
        assert str(e).startswith("bundle fuzz: ")
        event("refused")
        return
    event("accepted")
    _check_loaded(fields)


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory) -> Path:
    return Path(shutil.copytree(COND, tmp_path_factory.mktemp("fz") / "bundle"))


def _manifest_texts():
    base = json.dumps(BASE).encode()
    return st.one_of(
        mutated_manifests().map(lambda d: json.dumps(d, allow_nan=True).encode()),
        st.integers(0, len(base) - 1).map(lambda i: base[:i]),  # truncated
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 7)).map(
            lambda t: base[:t[0]] + bytes([base[t[0]] ^ (1 << t[1])]) + base[t[0] + 1:]),  # one bit flipped
        st.sampled_from([b"", b"\xff\xfe{}", b"\xef\xbb\xbf" + base, b"[" * 100_000, b'{"format": ' + b"9" * 5000 + b"}",
                         base.replace(b'"cut_ratio": 0.2', b'"cut_ratio": NaN'),
                         base.replace(b'"cut_ratio": 0.2', b'"cut_ratio": ' + b"1" * 400),
                         base.replace(b'"clip_sample_range": 1.0', b'"clip_sample_range": NaN'),
                         base.replace(b'"clip_sample_range": 1.0', b'"clip_sample_range": ' + b"1" * 400),
                         base.replace(b'"num_train_timesteps": 100', b'"num_train_timesteps": 1e999'),
                         base.replace(b'"num_train_timesteps": 100', b'"num_train_timesteps": "x"'),
                         base.replace(b'"num_train_timesteps": 100', b'"num_train_timesteps": [100]'),
                         b"x" * (4 * 2**20 + 1)]),
        st.binary(max_size=200),
    )


@FUZZ
@given(text=_manifest_texts())
def test_load_bundle_manifest_bytes_fuzz(fuzz_bundle, text):
    (fuzz_bundle / "manifest.json").write_bytes(text)
    try:
        b = load_bundle(fuzz_bundle, verify_hashes=False)
    except BundleError as e:
        assert str(e)
        event("refused")
        return
    event("accepted")
    _check_loaded(b.__dict__)
    json.dumps(b.describe(), allow_nan=True)


@pytest.mark.parametrize("text", [
    b"[" * 100_000,  # nesting past Python's recursion limit
    b'{"format": ' + b"9" * 5000 + b"}",  # an int past Python's digit limit (ValueError, not JSONDecodeError)
    json.dumps({**BASE, "cut_ratio": 10**400}).encode(),  # float() overflows
    json.dumps({**BASE, "schedule": {**BASE["schedule"], "num_train_timesteps": "x"}}).encode(),
    json.dumps({**BASE, "schedule": {**BASE["schedule"], "num_train_timesteps": [100]}}).encode(),
    json.dumps({**BASE, "schedule": {**BASE["schedule"], "clip_sample_range": 10**400}}).encode(),
    json.dumps({**BASE, "schedule": {**BASE["schedule"], "clip_sample_range": math.nan}}).encode(),
    json.dumps({**BASE, "schedule": {**BASE["schedule"], "num_train_timesteps": math.inf}}).encode(),
], ids=["deep", "long-int", "cut-overflow", "T-string", "T-list", "clip-overflow", "clip-nan", "T-inf"])
def test_manifest_regressions_are_bundle_errors(fuzz_bundle, text):
    """Regressions found by the fuzzer: each of these escaped load_bundle as a RecursionError,
    ValueError, OverflowError or TypeError (or loaded a NaN clip range) instead of a BundleError."""
    (fuzz_bundle / "manifest.json").write_bytes(text)
    with pytest.raises(BundleError):
        load_bundle(fuzz_bundle, verify_hashes=False)


# ---------------------------------------------------------------------------------------------
# bundle ONNX files (with a manifest re-hashed to match, so onnxruntime itself sees the damage)

ONNX = (COND / "denoiser.onnx").read_bytes()


def _rehash(bundle: Path, data: bytes) -> None:
    (bundle / "denoiser.onnx").write_bytes(data)
    doc = copy.deepcopy(BASE)
    for f in doc["files"]:
        if f["path"] == "denoiser.onnx":
            f["sha256"], f["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (bundle / "manifest.json").write_text(json.dumps(doc))


@st.composite
def damaged_onnx(draw):
    kind = draw(st.sampled_from(["flip", "flip", "flips", "truncate", "zero_run", "random"]))
    data = bytearray(ONNX)
    if kind == "flip":
        i = draw(st.integers(0, 2047) | st.integers(0, len(data) - 1))  # the graph lies at the front
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "flips":
        for _ in range(draw(st.integers(2, 20))):
            data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "zero_run":
        a = draw(st.integers(0, len(data) - 1))
        data[a:a + draw(st.integers(1, 256))] = b"\0" * len(data[a:a + 256])
    else:
        data = bytearray(draw(st.binary(max_size=512)))
    return bytes(data)


@settings(max_examples=max(60, EXAMPLES // 5), deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(data=damaged_onnx())
def test_damaged_onnx_is_a_bundle_error_or_still_runs(fuzz_bundle, data):
    assume(data != ONNX)
    _rehash(fuzz_bundle, data)
    try:
        rt = EdgeRuntime.open(fuzz_bundle)
    except BundleError as e:
        assert "denoiser.onnx" in str(e)
        event("refused")
        return
    # a flip inside the weights leaves a loadable model that runs; a flip in a shape constant can
    # leave one that onnxruntime loads but fails to run (or answers in the wrong shape): that is a
    # BundleError naming the model file, like a refusal at load time.
    x = np.zeros((2, 1, 8, 8), np.float32)
    try:
        out = rt.denoiser(x, np.array([3, 4], np.int64), np.array([0, 1], np.int64))
    except BundleError as e:
        assert "denoiser.onnx" in str(e)
        event("loaded, failed at run time")
        return
    assert out.shape == x.shape
    event("loaded and ran")
