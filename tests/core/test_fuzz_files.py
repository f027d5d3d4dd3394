"""Fuzzing of the files the core reads from others: MedMNIST-style ``.npz`` datasets
and run directories / checkpoints (JSON + safetensors).

Every damaged input — truncated, bit-flipped, wrong dtype, lying ``.npy`` headers, a header that
declares 10^12 elements, NaN/Inf, bad JSON, wrong types — ends in a valid result or in exactly one
of the project's errors (DataError, CheckpointError), without allocating what a header declares.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import resource
import shutil
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from collafuse.checkpoint import latest_checkpoint, load_run, read_state
from collafuse.data import load_npz
from collafuse.errors import CheckpointError, DataError
from tiny_runs import tiny_run_config

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# .npz datasets


def npy_member(descr: str, shape, payload: bytes, fortran: bool = False) -> bytes:
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    body = text.encode("latin1")
    pad = (64 - (10 + len(body) + 1) % 64) % 64
    body = body + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body + payload


def _array_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


IMAGE_DTYPES = ["|u1"] * 12 + ["<f4", "<f4", "<f8", "<f2", "|b1", "<i8", "<c8", ">f4", "<U2"]
LABEL_DTYPES = ["<i8"] * 12 + ["|u1", "<u8", "<f4", "|b1", "<U2"]


@st.composite
def npz_files(draw):
    n = draw(st.integers(0, 6) | st.integers(1, 6))
    hw = draw(st.sampled_from([(8, 8)] * 12 + [(4, 5), (0, 8), (1, 1), (8, 8, 1), (8, 8, 3), (8, 8, 4), (8,), ()]))
    ishape = (n, *hw)
    idt = draw(st.sampled_from(IMAGE_DTYPES))
    rng = np.random.default_rng(n)
    raw = rng.uniform(0, 1, math.prod(ishape))
    special = draw(st.sampled_from([None] * 12 + [np.nan, np.inf, -0.5, 2.0]))
    if special is not None and raw.size:
        raw[draw(st.integers(0, raw.size - 1))] = special
    if idt in ("|u1", "<i8"):
        raw = raw * 255
    with np.errstate(all="ignore"):
        images = raw.astype(np.dtype(idt)).reshape(ishape)
    lshape = draw(st.sampled_from([(n,)] * 12 + [(n, 1), (n, 2), (), (max(n - 1, 0),), (n + 1,)]))
    ldt = draw(st.sampled_from(LABEL_DTYPES))
    lab = draw(st.sampled_from(["small"] * 12 + ["negative", "huge", "max"]))
    lvals = {"small": rng.integers(0, 4, math.prod(lshape)), "negative": -rng.integers(1, 4, math.prod(lshape)),
             "huge": np.full(math.prod(lshape), 10**12), "max": np.full(math.prod(lshape), 2**63 - 1)}[lab]
    with np.errstate(all="ignore"):
        labels = lvals.astype(np.dtype(ldt)).reshape(lshape)
    members = {"train_images.npy": _array_bytes(images), "train_labels.npy": _array_bytes(labels)}
    kind = draw(st.sampled_from(["plain"] * 12 + ["giant_images", "giant_labels", "lying_header", "object",
                                                 "no_labels", "no_images", "extra_split", "truncate_member",
                                                 "truncate_file", "flip", "junk"]))
    if kind == "giant_images":
        members["train_images.npy"] = npy_member("|u1", (draw(st.sampled_from([10**12, 10**9, 2**62])), 8, 8),
                                                 b"\0" * 64)
    elif kind == "giant_labels":
        members["train_labels.npy"] = npy_member("<i8", (10**12,), b"\0" * 64)
    elif kind == "lying_header":
        members["train_images.npy"] = npy_member("|u1", (n + 3, 8, 8), images.tobytes())
    elif kind == "object":
        members["train_images.npy"] = npy_member("|O", (n, 8, 8), b"\0" * (8 * n * 64))
    elif kind == "no_labels":
        del members["train_labels.npy"]
    elif kind == "no_images":
        del members["train_images.npy"]
    elif kind == "extra_split":
        members["test_images.npy"] = _array_bytes(np.zeros((2, 5, 5), np.uint8))
        members["test_labels.npy"] = _array_bytes(np.zeros(2, np.int64))
    elif kind == "truncate_member":
        m = draw(st.sampled_from(sorted(members)))
        members[m] = members[m][:draw(st.integers(0, len(members[m]) - 1))]
    buf = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = buf.getvalue()
    if kind == "truncate_file":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    elif kind == "junk":
        data = draw(st.binary(max_size=200))
    return data


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("npz") / "fuzz.npz")


@FUZZ
@given(data=npz_files())
def test_load_npz_fuzz(npz_path, data):
    with open(npz_path, "wb") as f:
        f.write(data)
    rss = _rss_mb()
    try:
        ds = load_npz(npz_path, image_size=8)
    except DataError as e:
        assert str(e)
        event("refused")
        return
    finally:
        assert _rss_mb() - rss < 256, "loading a small .npz grew the process by more than 256 MB"
    event("loaded")
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4 and ds.images.shape[2:] == (8, 8)
    assert np.all(np.isfinite(ds.images)) and ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.labels.dtype == np.int64 and len(ds.labels) == len(ds.images) > 0
    assert ds.labels.min() >= 0 and ds.labels.max() < ds.num_classes == len(ds.class_names)


@pytest.mark.parametrize("shape", [(10**12, 8, 8), (10**9, 28, 28), (2**40, 2**20)], ids=["1e12", "1e9x28x28", "2^60"])
def test_npz_with_a_giant_declared_array_is_refused_before_allocating(npz_path, shape):
    """Regression: numpy's reader allocates what the member's header declares first: a few bytes
    declaring 10^12 images escaped as MemoryError (or reserved gigabytes) instead of a DataError."""
    with zipfile.ZipFile(npz_path, "w") as z:
        z.writestr("train_images.npy", npy_member("|u1", shape, b"\0" * 64))
        z.writestr("train_labels.npy", npy_member("<i8", shape[:1], b"\0" * 64))
    rss = _rss_mb()
    with pytest.raises(DataError, match="declares"):
        load_npz(npz_path, image_size=8)
    assert _rss_mb() - rss < 64


@pytest.mark.parametrize("labels", [np.int64(3), np.full(4, 10**12), np.zeros((0,), np.int64)],
                         ids=["scalar", "label-1e12", "empty"])
def test_npz_bad_labels_are_data_errors(npz_path, labels):
    n = 0 if labels.ndim and labels.size == 0 else 4
    np.savez(npz_path, train_images=np.zeros((n, 8, 8), np.uint8), train_labels=labels)
    with pytest.raises(DataError):
        load_npz(npz_path, image_size=8)


@pytest.mark.parametrize("patch", ["encrypted", "compression-99"])
def test_npz_with_an_encrypted_or_unknown_compression_member_is_a_data_error(npz_path, patch):
    """Regression (long fuzz run): zipfile's RuntimeError ("encrypted") and NotImplementedError
    (unknown compression method) escaped load_npz."""
    np.savez(npz_path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(4, np.int64))
    data = bytearray(open(npz_path, "rb").read())
    cd = data.index(b"PK\x01\x02")  # first central-directory entry: flags at +8, method at +10
    if patch == "encrypted":
        data[cd + 8] |= 1
    else:
        data[cd + 10:cd + 12] = (99).to_bytes(2, "little")
    open(npz_path, "wb").write(bytes(data))
    with pytest.raises(DataError):
        load_npz(npz_path, image_size=8)


# ---------------------------------------------------------------------------------------------
# run directories and checkpoints


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    import torch

    from collafuse.train import train

    d = str(tmp_path_factory.mktemp("ckpt") / "run")
    torch.manual_seed(0)
    train(tiny_run_config(steps=2, checkpoint_every=2), d, progress=False)
    return d


def _files(run: str) -> list[str]:
    ckpt = latest_checkpoint(run)
    names = ["config.json", "data.json", "LATEST"]
    names += [os.path.relpath(os.path.join(ckpt, f), run) for f in sorted(os.listdir(ckpt))]
    return names


json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=10) | st.sampled_from([0, -1, 10**400, "step_0000002"]))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


def _json_paths(doc, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _json_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _json_paths(v, prefix + (i,))
    return out


def _mutate_json(draw, doc):
    doc = copy.deepcopy(doc)
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    paths = _json_paths(doc)
    if not paths:
        return draw(json_values)
    path = draw(st.sampled_from(paths))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return doc


def _safetensors_header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _safetensors(header: dict, rest: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + rest


@st.composite
def checkpoint_damage(draw, names: list[str], originals: dict[str, bytes]):
    """(file name, new bytes, rehash?) — rehash: state.json's sha256 is made to match, so the
    reader's parsers (not just the hash check) meet the damage."""
    name = draw(st.sampled_from(names))
    data = originals[name]
    kinds = ["truncate", "flip", "random"]
    if name.endswith(".json"):
        kinds += ["json"] * 4
    if name.endswith(".safetensors"):
        kinds += ["st_header"] * 4 + ["st_len"]
    if name == "LATEST":
        kinds += ["latest"] * 3
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    elif kind == "random":
        data = draw(st.binary(max_size=100))
    elif kind == "json":
        data = json.dumps(_mutate_json(draw, json.loads(data)), allow_nan=True).encode()
    elif kind == "latest":
        data = draw(st.sampled_from([b"step_9999999\n", b"../config.json", b"step_/../..", b"\xff\xfe", b"",
                                     b"step_0000002\x00", b"step_" + b"9" * 300]))
    elif kind == "st_len":
        data = struct.pack("<Q", draw(st.sampled_from([0, 2**63, 2**64 - 1, len(data), 7]))) + data[8:]
    else:  # rewrite one tensor's header entry
        header, rest = _safetensors_header(data)
        key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "all"]))
        entry = header[key]
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F64", "F16", "I64", "BOOL", "U8", "XX", ""]))
        elif field == "shape":
            entry["shape"] = draw(st.sampled_from([[10**12], [2**40, 2**40], [-1], [], [0], ["a"]])
                                  | st.lists(st.integers(0, 9), max_size=4))
        elif field == "data_offsets":
            entry["data_offsets"] = draw(st.lists(st.integers(-2, 2**63), min_size=0, max_size=3))
        else:
            header[key] = draw(json_values)
        data = _safetensors(header, rest)
    return name, data, draw(st.booleans())


def _rehash(run: str, name: str, data: bytes) -> None:
    ckpt = latest_checkpoint(run)
    state_path = os.path.join(ckpt, "state.json")
    meta = json.loads(open(state_path, "rb").read())
    meta["files"][os.path.basename(name)] = hashlib.sha256(data).hexdigest()
    with open(state_path, "w") as f:
        json.dump(meta, f)


def _load_everything(run: str):
    load_run(run)
    read_state(latest_checkpoint(run))


def run_checkpoint_fuzz(tiny_run: str, tmp_path, examples: int) -> dict:
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    names = _files(run)
    originals = {n: open(os.path.join(run, n), "rb").read() for n in names}
    seen = {"refused": 0, "loaded": 0}

    @settings(FUZZ, max_examples=examples)
    @given(damage=checkpoint_damage(names, originals))
    def fuzz(damage):
        name, data, rehash = damage
        try:
            with open(os.path.join(run, name), "wb") as f:
                f.write(data)
            if rehash and ".safetensors" in name:
                _rehash(run, name, data)
            rss = _rss_mb()
            try:
                _load_everything(run)
                seen["loaded"] += 1
            except CheckpointError as e:
                assert str(e)
                seen["refused"] += 1
            assert _rss_mb() - rss < 256
        finally:
            for n, b in originals.items():  # restore every file for the next example
                with open(os.path.join(run, n), "wb") as f:
                    f.write(b)

    fuzz()
    return seen


def test_checkpoint_fuzz(tiny_run, tmp_path):
    seen = run_checkpoint_fuzz(tiny_run, tmp_path, 80)  # each load builds four UNets: ~0.2 s
    assert seen["refused"] > 20 and seen["loaded"] > 0, seen


@pytest.mark.slow
def test_checkpoint_fuzz_long(tiny_run, tmp_path):
    seen = run_checkpoint_fuzz(tiny_run, tmp_path, 1500)
    assert seen["refused"] > 300, seen


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(data=npz_files())
def test_load_npz_fuzz_long(npz_path, data):
    test_load_npz_fuzz.hypothesis.inner_test(npz_path, data)


@pytest.mark.parametrize("state", [
    None, [], {"format": 1, "step": 2, "files": {"/dev/zero": "0" * 64}},
    {"format": 1, "step": 2, "files": {"../../config.json": "0" * 64}}, {"format": 1, "step": "2"},
    {"format": 1, "step": 2, "files": [1, 2]}, {"format": 1},
], ids=["null", "list", "abs-path", "dotdot", "step-str", "files-list", "no-step"])
def test_hostile_state_json_is_a_checkpoint_error(tiny_run, tmp_path, state):
    """Regressions found by the fuzzer: a state.json that is not an object escaped as AttributeError;
    a 'files' entry '/dev/zero' made the hash check read forever; a missing step was a KeyError."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    with open(os.path.join(latest_checkpoint(run), "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointError):
        load_run(run)


@pytest.mark.parametrize("latest", [b"\xff\xfe", b"step_/../..", b"../config.json", b"step_" + b"9" * 300])
def test_hostile_latest_is_a_checkpoint_error(tiny_run, tmp_path, latest):
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)
    with open(os.path.join(run, "LATEST"), "wb") as f:
        f.write(latest)
    with pytest.raises(CheckpointError):
        load_run(run)
