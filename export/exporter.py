"""Export one client's denoiser as an edge bundle (docs/architecture.md#contracts): ONNX + validated manifest.

    result = export_bundle(unet, schedule, cut_ratio=0.2, out_dir="bundle/",
                           config=ExportConfig(precision="int8"),
                           calibration_images=client.train_images, calibration_labels=client.train_labels)

Steps: torch → fp32 ONNX (dynamo, legacy fallback) → validation against torch → optional fp16 /
int8 variant + quality gate against fp32 (+ a speed measurement) → files + sha256 → manifest.
The bundle is assembled in a temporary folder next to ``out_dir`` and moved into place at the
end, so a failed export never leaves a half-written bundle.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from collafuse_edge.bundle import (
    MANIFEST_NAME,
    PRECISIONS,
    build_manifest,
    file_entry,
    load_bundle,
    write_manifest,
)
from collafuse_edge.files import jsonable
from collafuse_edge.sampler import SamplerConfig
from collafuse_edge.schedule import Schedule, client_level_count
from collafuse_edge.validation import check_choice, check_int

from .errors import ExportError
from .onnx_export import EXPORTERS, MIN_OPSET, export_onnx, model_facts
from .validate import validate_onnx
from .variants import (
    DEFAULT_GATES,
    GateThresholds,
    Int8Options,
    client_inputs,
    handoff_samples,
    measure_speed,
    quality_gate,
    to_fp16,
    to_int8,
)

MODEL_FILE = "denoiser.onnx"


@dataclass(frozen=True)
class ExportConfig:
    """How to export. Defaults: fp32, opset 18, dynamo exporter with legacy fallback."""

    precision: str = "fp32"  # "fp32" | "fp16" | "int8"
    opset: int = MIN_OPSET
    exporter: str = "auto"  # "auto" (dynamo, legacy on failure) | "dynamo" | "legacy"
    atol: float = 1e-4  # fp32 ONNX vs torch: |Δ| ≤ atol + rtol·|torch|
    rtol: float = 1e-3
    validation_batches: tuple[int, ...] = (1, 2, 7)
    calibration_inputs: int = 512  # int8: calibration inputs (client images × client levels)
    gate_inputs: int = 256  # quality gate: held-out single-call inputs
    gate_images: int = 16  # quality gate: images run through the whole client loop
    gate: GateThresholds | None = None  # None: DEFAULT_GATES[precision]
    int8: Int8Options = field(default_factory=Int8Options)
    measure_speed: bool = True  # variants: time them against fp32 on this CPU
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS, error=ExportError)
        check_choice("exporter", self.exporter, EXPORTERS, error=ExportError)
        if not (self.atol >= 0 and self.rtol >= 0):
            raise ExportError(f"atol and rtol must be ≥ 0, got {self.atol}, {self.rtol}")
        object.__setattr__(self, "validation_batches", tuple(self.validation_batches))
        if not self.validation_batches or any(b < 1 for b in self.validation_batches):
            raise ExportError(f"validation_batches must be positive, got {self.validation_batches}")
        for name in ("calibration_inputs", "gate_inputs", "gate_images"):
            check_int(name, getattr(self, name), low=1, error=ExportError)


@dataclass(frozen=True)
class ExportResult:
    bundle_dir: Path
    manifest: dict

    @property
    def validation(self) -> dict:
        return self.manifest["validation"]

    @property
    def quality_gate(self) -> dict | None:
        return self.manifest.get("quality_gate")

    @property
    def speed(self) -> dict | None:
        return self.manifest.get("speed")


def producer_versions() -> dict:
    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    out = {d: ver(d) for d in ("collafuse", "collafuse-edge", "diffusers", "onnx", "onnxscript", "onnxruntime")}
    out["torch"] = torch.__version__
    out["python"] = platform.python_version()
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ExportError(f"output {out} already holds files; choose a new directory or pass overwrite")
    if not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"refusing to overwrite {out}: it holds files but is not a bundle (no {MANIFEST_NAME})")


def export_bundle(
    unet: torch.nn.Module,
    schedule: Schedule,
    cut_ratio: float,
    out_dir: str | os.PathLike,
    *,
    config: ExportConfig = ExportConfig(),
    calibration_images: np.ndarray | None = None,
    calibration_labels: np.ndarray | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    sampler: dict | None = None,
    client_classes: list[int] | None = None,
) -> ExportResult:
    """Export ``unet`` (a client's diffusers ``UNet2DModel``) for cut ratio ``cut_ratio``.

    ``calibration_images`` ``[N,C,H,W]`` in [-1, 1] (the client's own training images, with
    ``calibration_labels`` ``[N]``) calibrate int8 and feed the quality gate; int8 requires them.
    ``source`` is recorded in the manifest (e.g. run directory, client index, training step).
    ``client_classes``: the classes the client trained on (a conditional model); the edge
    draws its default labels from them.
    ``sampler`` (:func:`collafuse_edge.bundle.sampler_section`) marks ``unet`` as a distilled
    few-step student: the bundle records its timetable and the edge runs exactly those steps.
    """
    cfg = config
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    image_shape, num_classes = model_facts(unet)
    k = client_level_count(cut_ratio, schedule.T)
    if k < 1:
        raise ExportError(f"cut ratio {cut_ratio} gives the client no levels at T={schedule.T}; nothing to export")
    if calibration_images is not None:
        calibration_images = np.asarray(calibration_images, dtype=np.float32)
        if calibration_images.ndim != 4 or tuple(calibration_images.shape[1:]) != image_shape:
            raise ExportError(f"calibration images must be [N, {', '.join(map(str, image_shape))}], "
                              f"got {list(calibration_images.shape)}")
        if calibration_labels is not None and len(calibration_labels) != len(calibration_images):
            raise ExportError("calibration_labels must have one label per calibration image")
    elif cfg.precision == "int8":
        raise ExportError("int8 export needs calibration images (the client's own training images)")
    was_training = unet.training
    unet.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        onnx_dir = work / "fp32"
        info = export_onnx(unet, onnx_dir / MODEL_FILE, opset=cfg.opset, exporter=cfg.exporter)
        report = validate_onnx(info.path, unet, levels=_validation_levels(k), batch_sizes=cfg.validation_batches,
                               atol=cfg.atol, rtol=cfg.rtol, seed=cfg.seed)
        extra: dict = {
            "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "against": "torch fp32 (onnxruntime CPU)"},
            "validation": report.to_dict(),
        }
        bundle_dir = work / "bundle"
        bundle_dir.mkdir()
        model_info = {**info.to_dict(), "params": int(sum(p.numel() for p in unet.parameters()))}
        if cfg.precision == "fp32":
            shutil.copyfile(info.path, bundle_dir / MODEL_FILE)
        else:
            gate_sampler = SamplerConfig("distilled", int(sampler["steps"])) if sampler else SamplerConfig()
            extra.update(_make_variant(cfg, info.path, bundle_dir / MODEL_FILE, schedule, k, image_shape,
                                       num_classes, calibration_images, calibration_labels, gate_sampler))
        extra["producer"] = producer_versions()
        extra["created_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if source:
            extra["source"] = source
        if client_classes is not None:
            if num_classes is None or not client_classes or any(not 0 <= int(c) < num_classes for c in client_classes):
                raise ExportError(f"client_classes must be class ids in [0, {num_classes}) of a conditional model, "
                                  f"got {client_classes!r}")
            extra["client_classes"] = sorted({int(c) for c in client_classes})
        manifest = build_manifest(
            model_file=MODEL_FILE, files=[file_entry(bundle_dir, MODEL_FILE)], image_shape=image_shape,
            num_classes=num_classes, schedule=schedule, cut_ratio=cut_ratio, precision=cfg.precision,
            model_info=model_info, extra=jsonable(extra), sampler=jsonable(sampler) if sampler else None,
        )
        write_manifest(bundle_dir, manifest)
        load_bundle(bundle_dir)  # the runtime's reader must accept what we wrote
        if out.exists():
            shutil.rmtree(out)
        os.replace(bundle_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        unet.train(was_training)
    return ExportResult(out, manifest)


def _validation_levels(k: int) -> list[int]:
    """The client's first and last level, plus a spread in between."""
    return sorted({0, k - 1, *np.linspace(0, k - 1, 9).round().astype(int).tolist()})


def _make_variant(cfg: ExportConfig, fp32: Path, dst: Path, schedule: Schedule, k: int,
                  image_shape: tuple[int, int, int], num_classes: int | None,
                  images: np.ndarray | None, labels: np.ndarray | None,
                  sampler: SamplerConfig = SamplerConfig()) -> dict:
    gate_data = "client images"
    if images is None:  # fp16 without client data: a uniform-noise stand-in
        images = np.random.default_rng(cfg.seed).uniform(-1, 1, (64, *image_shape)).astype(np.float32)
        labels, gate_data = None, "uniform random images (no client data given)"
    if cfg.precision == "fp16":
        details = to_fp16(fp32, dst)
    else:
        calib = client_inputs(schedule, k, images, labels, num_classes, cfg.calibration_inputs, seed=cfg.seed)
        details = to_int8(fp32, dst, calib, cfg.int8)
    evals = client_inputs(schedule, k, images, labels, num_classes, cfg.gate_inputs, seed=cfg.seed + 1)
    handoff, hl = handoff_samples(schedule, k, images, labels, num_classes, cfg.gate_images, seed=cfg.seed + 2)
    gate = quality_gate(fp32, dst, precision=cfg.precision, schedule=schedule, client_levels=k,
                        eval_inputs=evals, handoff=handoff, handoff_labels=hl,
                        thresholds=cfg.gate or DEFAULT_GATES[cfg.precision], sampler=sampler,
                        seed=cfg.seed)
    gate["data"] = gate_data
    out = {"variant": {"precision": cfg.precision, **details}, "quality_gate": gate}
    if cfg.measure_speed:
        out["speed"] = measure_speed(fp32, dst, image_shape, num_classes)
    return out


__all__ = ["ExportConfig", "ExportResult", "export_bundle", "producer_versions"]
