"""Exported client bundles: ``manifest.json`` plus one single-file ONNX model (docs/architecture.md#contracts).

A bundle is what ``collafuse export`` writes and what ``collafuse-edge`` runs. This module reads,
validates and writes manifests with json and sha256 only (no torch, no onnx, no onnxruntime),
so a device can check a bundle before it loads anything heavy.

Layout::

    BUNDLE/
      manifest.json      format, files + sha256, IO, image shape, classes, schedule, cut, precision
      denoiser.onnx      ε̂ = model(sample [B,C,H,W] f32, timestep [B] i64, class_labels [B] i64)

Example::

    b = load_bundle("bundle/")        # verifies the schema and every file's sha256
    b.handoff_level, b.schedule.T, b.model_file
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError, ScheduleError
from .files import atomic_write_text, sha256_file  # sha256_file: also importable from here, as before
from .sampler import SamplerConfig
from .schedule import DISTILLED, Schedule, client_level_count, distilled_timetable
from .validation import is_int

FORMAT_NAME = "collafuse-edge-bundle"
# 2 adds the optional "sampler" section (a distilled few-step student and its timetable);
# a version-1 manifest is the same document without it and still reads.
FORMAT_VERSION = 2
READABLE_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST_NAME = "manifest.json"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
BATCH_DIM = "batch"  # the symbolic name of the dynamic batch axis (axis 0 of every tensor)

# The model's interface in format version 1: name → dtype. class_labels only when conditional.
SAMPLE, TIMESTEP, CLASS_LABELS, EPS = "sample", "timestep", "class_labels", "eps"
_INPUT_DTYPES = {SAMPLE: "float32", TIMESTEP: "int64", CLASS_LABELS: "int64"}
_OUTPUT_DTYPES = {EPS: "float32"}

_MAX_MANIFEST_BYTES = 4 * 2**20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` holds ints and the symbolic ``"batch"`` at axis 0."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle directory, a plain file name
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Bundle:
    """A validated bundle. Fields mirror ``manifest.json``; ``manifest`` keeps the raw document."""

    path: Path
    model_file: Path
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int | None
    schedule: Schedule
    cut_ratio: float
    client_levels: int  # k: the client runs levels k-1 … 0
    handoff_level: int  # k-1: the level of the sample the server hands over
    precision: str
    manifest: dict
    # a distilled student's sampler (its "sampler" section); None: an ordinary client model
    sampler: SamplerConfig | None = None

    @property
    def distilled(self) -> bool:
        return self.sampler is not None

    def sampler_for(self, requested: SamplerConfig) -> SamplerConfig:
        """The sampler this bundle's model runs: a distilled student always runs its own
        timetable (the model was trained for exactly those levels); an ordinary model runs what
        the caller asked for."""
        return self.sampler if self.sampler is not None else requested

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def local_only(self) -> bool:
        """c = 1: the client owns every level and needs no server."""
        return self.client_levels == self.schedule.T

    def check_compatible(
        self,
        *,
        schedule: Schedule | None = None,
        handoff_level: int | None = None,
        image_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        source: str = "the server",
    ) -> None:
        """Refuse to pair this bundle with a peer (e.g. the server's ``/v1/info``) that disagrees.

        Every given argument is compared; the error lists every disagreement at once.
        """
        problems = []
        if schedule is not None and not self.schedule.same_as(schedule):
            problems.append(
                f"schedule differs (bundle: T={self.schedule.T} {self.schedule.beta_schedule}, "
                f"{source}: T={schedule.T} {schedule.beta_schedule})"
            )
        if handoff_level is not None and int(handoff_level) != self.handoff_level:
            problems.append(
                f"handoff level differs (bundle: {self.handoff_level}, {source}: {handoff_level})"
            )
        if image_shape is not None and tuple(image_shape) != self.image_shape:
            problems.append(
                f"image shape differs (bundle: {self.image_shape}, {source}: {tuple(image_shape)})"
            )
        if num_classes is not None and num_classes != self.num_classes:
            problems.append(
                f"number of classes differs (bundle: {self.num_classes}, {source}: {num_classes})"
            )
        if problems:
            raise BundleError(
                f"bundle {self.path} does not match {source}: " + "; ".join(problems)
                + ". Export a bundle from the same run the server serves."
            )

    def describe(self) -> dict:
        """A short JSON-ready summary (what ``collafuse-edge info`` prints)."""
        m = self.manifest
        return {
            "bundle": str(self.path),
            "format_version": m["format_version"],
            "model_file": self.model_file.name,
            "model_bytes": next(f.bytes for f in self.files if f.path == self.model_file.name),
            "precision": self.precision,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "num_train_timesteps": self.schedule.T,
            "beta_schedule": self.schedule.beta_schedule,
            "cut_ratio": self.cut_ratio,
            "client_levels": self.client_levels,
            "handoff_level": self.handoff_level,
            "local_only": self.local_only,
            "sampler": m.get("sampler"),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "exporter": m.get("model", {}).get("exporter"),
            "opset": m.get("model", {}).get("opset"),
            "tolerance": m.get("tolerance"),
            "quality_gate": m.get("quality_gate"),
            "speed": m.get("speed"),
            "producer": m.get("producer"),
            "source": m.get("source"),
        }


# ---------------------------------------------------------------------------------------------
# hashing


def file_entry(bundle_dir: str | os.PathLike, name: str) -> FileEntry:
    """The manifest entry (sha256, size) of ``bundle_dir/name``."""
    p = Path(bundle_dir) / name
    return FileEntry(path=name, sha256=sha256_file(p), bytes=p.stat().st_size)


# ---------------------------------------------------------------------------------------------
# reading


def _fail(where: Path, what: str) -> BundleError:
    return BundleError(f"bundle {where}: {what}")


def _get(d: dict, key: str, types: type | tuple, where: Path, ctx: str = "manifest") -> Any:
    if key not in d:
        raise _fail(where, f"{ctx} has no {key!r} field; the file is not a complete collafuse bundle manifest")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(where, f"{ctx} field {key!r} must be {_type_names(types)}, got {v!r}")
    if not isinstance(v, types):
        raise _fail(where, f"{ctx} field {key!r} must be {_type_names(types)}, got {type(v).__name__} {v!r:.60}")
    return v


def _type_names(types: type | tuple) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({"NoneType": "null"}.get(t.__name__, t.__name__) for t in ts)


def _tensor_specs(raw: Any, expected: dict[str, str], kind: str, image_shape: tuple[int, ...] | None,
                  where: Path) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(where, f"manifest model.{kind} must be a non-empty list of tensor specs")
    specs = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict):
            raise _fail(where, f"manifest model.{kind}[{i}] must be an object")
        ctx = f"manifest model.{kind}[{i}]"
        name = _get(s, "name", str, where, ctx)
        dtype = _get(s, "dtype", str, where, ctx)
        shape = _get(s, "shape", list, where, ctx)
        if not shape or shape[0] != BATCH_DIM:
            raise _fail(where, f"{kind[:-1]} {name!r} must have the dynamic batch axis {BATCH_DIM!r} "
                               f"first, got shape {shape}")
        if any(not is_int(d) or d < 1 for d in shape[1:]):
            raise _fail(where, f"{kind[:-1]} {name!r} has an invalid shape {shape}")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    names = [s.name for s in specs]
    if sorted(names) != sorted(expected):
        raise _fail(
            where,
            f"model {kind} are {names} but a bundle of format version {FORMAT_VERSION} with this "
            f"conditioning needs exactly {sorted(expected)}; the model was not exported by "
            f"collafuse export (or for another format version)",
        )
    for s in specs:
        if s.dtype != expected[s.name]:
            raise _fail(where, f"{kind[:-1]} {s.name!r} has dtype {s.dtype}, expected {expected[s.name]}")
        if s.name in (SAMPLE, EPS) and image_shape is not None and s.shape[1:] != image_shape:
            raise _fail(where, f"{kind[:-1]} {s.name!r} has shape {list(s.shape)} but image_shape is "
                               f"{list(image_shape)}")
        if s.name in (TIMESTEP, CLASS_LABELS) and len(s.shape) != 1:
            raise _fail(where, f"input {s.name!r} must have shape [{BATCH_DIM!r}], got {list(s.shape)}")
    return tuple(specs)


def parse_manifest(doc: Any, where: Path) -> dict:
    """Check a parsed manifest document against format versions 1 and 2; returns the fields the
    :class:`Bundle` needs. Raises :class:`BundleError` naming the first problem found."""
    if not isinstance(doc, dict):
        raise _fail(where, f"{MANIFEST_NAME} must hold a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if fmt != FORMAT_NAME:
        raise _fail(where, f"{MANIFEST_NAME} has format {fmt!r}, expected {FORMAT_NAME!r}; "
                           f"this is not a collafuse bundle")
    version = doc.get("format_version")
    if not is_int(version):
        raise _fail(where, f"format_version must be an integer, got {version!r}")
    if version not in READABLE_VERSIONS:
        newer = version > FORMAT_VERSION
        raise _fail(
            where,
            f"format_version {version} is not supported (this collafuse-edge reads version "
            f"{FORMAT_VERSION}); " + ("upgrade collafuse-edge" if newer else
                                      "re-export the bundle with a current collafuse"),
        )

    # image shape and classes
    image_shape = _get(doc, "image_shape", list, where)
    if len(image_shape) != 3 or any(not is_int(d) or d < 1 for d in image_shape):
        raise _fail(where, f"image_shape must be [C, H, W] of positive integers, got {image_shape}")
    image_shape = tuple(image_shape)
    num_classes = _get(doc, "num_classes", (int, type(None)), where)
    if num_classes is not None and num_classes < 1:
        raise _fail(where, f"num_classes must be a positive integer or null, got {num_classes}")

    # files
    files_raw = _get(doc, "files", list, where)
    files = []
    for i, f in enumerate(files_raw):
        if not isinstance(f, dict):
            raise _fail(where, f"files[{i}] must be an object")
        path = _get(f, "path", str, where, f"files[{i}]")
        if not _SAFE_NAME.match(path) or path == MANIFEST_NAME:
            raise _fail(where, f"files[{i}].path {path!r} is not a plain file name inside the bundle")
        sha = _get(f, "sha256", str, where, f"files[{i}]")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise _fail(where, f"files[{i}].sha256 must be 64 lowercase hex digits, got {sha!r:.80}")
        size = _get(f, "bytes", int, where, f"files[{i}]")
        if size < 0:
            raise _fail(where, f"files[{i}].bytes must be ≥ 0, got {size}")
        files.append(FileEntry(path, sha, size))
    if len({f.path for f in files}) != len(files):
        raise _fail(where, "files lists the same path twice")

    # model and its interface
    model = _get(doc, "model", dict, where)
    model_file = _get(model, "file", str, where, "manifest model")
    if model_file not in {f.path for f in files}:
        raise _fail(where, f"model.file {model_file!r} is not listed in files (with its sha256)")
    expected_in = {k: v for k, v in _INPUT_DTYPES.items() if k != CLASS_LABELS or num_classes is not None}
    inputs = _tensor_specs(model.get("inputs"), expected_in, "inputs", image_shape, where)
    outputs = _tensor_specs(model.get("outputs"), _OUTPUT_DTYPES, "outputs", image_shape, where)

    # schedule and the cut
    sched_raw = _get(doc, "schedule", dict, where)
    try:
        schedule = Schedule.from_dict(sched_raw)
    except (ScheduleError, TypeError, ValueError, OverflowError) as e:  # e.g. num_train_timesteps "x", [1], 1e999
        raise _fail(where, f"schedule is invalid: {e}") from e
    if not math.isfinite(schedule.clip_sample_range):
        raise _fail(where, f"schedule is invalid: clip_sample_range must be finite, got {schedule.clip_sample_range}")
    cut = _get(doc, "cut_ratio", (int, float), where)
    if not (0.0 < cut <= 1.0):  # NaN fails too; no float() first: a 400-digit int would overflow it
        raise _fail(where, f"cut_ratio must lie in (0, 1] for a client bundle, got {cut!r:.40}")
    k = client_level_count(float(cut), schedule.T)
    if k < 1:
        raise _fail(where, f"cut_ratio {cut} leaves the client no level at T={schedule.T}")
    client_levels = _get(doc, "client_levels", int, where)
    handoff = _get(doc, "handoff_level", int, where)
    if client_levels != k or handoff != k - 1:
        raise _fail(
            where,
            f"schedule mismatch: cut_ratio {cut} with T={schedule.T} gives k={k} client levels "
            f"and handoff level {k - 1}, but the manifest says client_levels={client_levels}, "
            f"handoff_level={handoff}",
        )

    precision = _get(doc, "precision", str, where)
    if precision not in PRECISIONS:
        raise _fail(where, f"precision {precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")
    sampler = None
    if "sampler" in doc:
        if version < 2:
            raise _fail(where, "a 'sampler' section needs format_version 2; re-export the bundle")
        sampler = _parse_sampler(doc["sampler"], k, where)
    return dict(
        files=tuple(files), model_file=model_file, inputs=inputs, outputs=outputs,
        image_shape=image_shape, num_classes=num_classes, schedule=schedule,
        cut_ratio=float(cut), client_levels=k, handoff_level=k - 1, precision=precision, sampler=sampler,
    )


def sampler_section(steps: int, client_levels: int, **info: Any) -> dict:
    """The manifest's ``sampler`` section of a distilled student of ``steps`` steps on a client of
    ``client_levels`` levels (``info``: method, teacher, … recorded alongside)."""
    levels = distilled_timetable(client_levels, steps).levels
    return {"kind": DISTILLED, "steps": int(steps), "levels": [int(v) for v in levels], "step": "ddim, eta 0", **info}


def _parse_sampler(raw: Any, k: int, where: Path) -> SamplerConfig:
    """The ``sampler`` section: a distilled student's step count and the levels it was trained on,
    which must be exactly :func:`schedule.distilled_timetable` of this bundle's cut."""
    if not isinstance(raw, dict):
        raise _fail(where, f"manifest field 'sampler' must be an object, got {type(raw).__name__}")
    kind = _get(raw, "kind", str, where, "manifest sampler")
    if kind != DISTILLED:
        raise _fail(where, f"sampler kind {kind!r:.40} is unknown; this collafuse-edge runs {DISTILLED!r} bundles")
    steps = _get(raw, "steps", int, where, "manifest sampler")
    if not (1 <= steps <= k):
        raise _fail(where, f"sampler steps must lie in [1, {k}] (the client's levels), got {steps}")
    levels = _get(raw, "levels", list, where, "manifest sampler")
    expected = [int(v) for v in distilled_timetable(k, steps).levels]
    if levels != expected or not all(is_int(v) for v in levels):
        raise _fail(where, f"sampler levels {levels!r:.120} are not the {steps}-step timetable of a client with "
                           f"{k} levels ({expected}); the manifest was edited or written by another tool")
    return SamplerConfig(DISTILLED, steps)


def verify_files(bundle_dir: Path, files: tuple[FileEntry, ...], hashes: bool = True) -> None:
    """Every listed file exists with the listed size (and sha256 when ``hashes``)."""
    for f in files:
        p = bundle_dir / f.path
        if not p.is_file():
            raise _fail(bundle_dir, f"file {f.path} listed in the manifest is missing; "
                                    f"copy the whole bundle directory")
        size = p.stat().st_size
        if size != f.bytes:
            raise _fail(bundle_dir, f"file {f.path} is {size} bytes but the manifest says {f.bytes} "
                                    f"(truncated or replaced); re-export or re-download the bundle")
        if hashes:
            digest = sha256_file(p)
            if digest != f.sha256:
                raise _fail(bundle_dir, f"file {f.path} has sha256 {digest[:16]}… but the manifest "
                                        f"says {f.sha256[:16]}…: it was modified or corrupted; "
                                        f"re-export or re-download the bundle")


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """Read and validate the bundle at ``path``; raises :class:`BundleError` on any problem."""
    where = Path(path)
    if not where.is_dir():
        raise BundleError(f"bundle {where}: no such directory; pass the folder that holds {MANIFEST_NAME}")
    mpath = where / MANIFEST_NAME
    if not mpath.is_file():
        raise _fail(where, f"{MANIFEST_NAME} is missing; this is not a collafuse bundle directory")
    size = mpath.stat().st_size
    if size > _MAX_MANIFEST_BYTES:
        raise _fail(where, f"{MANIFEST_NAME} is {size} bytes, over the {_MAX_MANIFEST_BYTES} byte limit")
    try:
        doc = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 5000-digit int
        raise _fail(where, f"{MANIFEST_NAME} is not valid JSON ({str(e)[:200]}); the file is corrupted") from e
    fields = parse_manifest(doc, where)
    verify_files(where, fields["files"], hashes=verify_hashes)
    model_file = where / fields.pop("model_file")
    return Bundle(path=where, model_file=model_file, manifest=doc, **fields)


# ---------------------------------------------------------------------------------------------
# writing (used by the exporter in collafuse.export; json and hashing only)


def model_io(image_shape: tuple[int, int, int], num_classes: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The declared interface of a format-1 denoiser for this image shape and conditioning."""
    img = (BATCH_DIM, *image_shape)
    inputs = [TensorSpec(SAMPLE, "float32", img), TensorSpec(TIMESTEP, "int64", (BATCH_DIM,))]
    if num_classes is not None:
        inputs.append(TensorSpec(CLASS_LABELS, "int64", (BATCH_DIM,)))
    return inputs, [TensorSpec(EPS, "float32", img)]


def build_manifest(
    *,
    model_file: str,
    files: list[FileEntry],
    image_shape: tuple[int, int, int],
    num_classes: int | None,
    schedule: Schedule,
    cut_ratio: float,
    precision: str,
    model_info: dict | None = None,
    extra: dict | None = None,
    sampler: dict | None = None,
) -> dict:
    """A manifest document (the current format version). ``model_info`` adds to the ``model`` section (exporter,
    opset, …); ``extra`` adds top-level sections (tolerance, validation, producer, …)."""
    k = client_level_count(cut_ratio, schedule.T)
    inputs, outputs = model_io(image_shape, num_classes)
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "file": model_file,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            **(model_info or {}),
        },
        "files": [f.to_dict() for f in files],
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "schedule": schedule.to_dict(),
        "cut_ratio": float(cut_ratio),
        "client_levels": k,
        "handoff_level": k - 1,
        "precision": precision,
    }
    if sampler is not None:  # a distilled student: sampler_section(...)
        doc["sampler"] = sampler
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"extra manifest section {key!r} would overwrite a required field")
        doc[key] = value
    return doc


def write_manifest(bundle_dir: str | os.PathLike, doc: dict) -> Path:
    """Validate ``doc`` and the files it lists, then write ``manifest.json``."""
    where = Path(bundle_dir)
    fields = parse_manifest(json.loads(json.dumps(doc)), where)  # the reader's own checks
    verify_files(where, fields["files"], hashes=True)
    out = where / MANIFEST_NAME
    atomic_write_text(out, json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return out
