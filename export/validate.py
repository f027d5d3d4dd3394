"""Validate an exported denoiser against its torch reference, optimum-style.

onnxruntime (CPU, all graph optimisations: what the edge runtime runs) and torch see the same
random inputs at several batch sizes and at levels drawn from the client's own range; every
mismatch (case, output name, shapes, max |Δ|) is collected before one error is raised.

Example::

    report = validate_onnx("denoiser.onnx", unet, levels=range(200), atol=1e-4, rtol=1e-3)
    report.max_abs_diff
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch

from collafuse_edge.bundle import CLASS_LABELS, EPS, SAMPLE, TIMESTEP

from .errors import ValidationError
from .onnx_export import eps_module, model_facts


@dataclass(frozen=True)
class Mismatch:
    case: str
    output: str
    problem: str

    def __str__(self) -> str:
        return f"[{self.case}] {self.output}: {self.problem}"


@dataclass(frozen=True)
class ValidationReport:
    atol: float
    rtol: float
    cases: list[dict] = field(default_factory=list)  # batch, levels, max_abs_diff per case
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.cases), default=float("nan"))

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "max_abs_diff": self.max_abs_diff,
                "batch_sizes": sorted({c["batch"] for c in self.cases}), "cases": self.cases,
                "passed": self.passed}


def cpu_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def validation_cases(levels: Sequence[int], batch_sizes: Sequence[int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(name, per-row levels) cases: each batch size with mixed levels, plus every batch size
    at the two ends of the client's range (the first and the last step it runs)."""
    lv = np.asarray(sorted(set(int(v) for v in levels)), dtype=np.int64)
    if lv.size == 0:
        raise ValidationError("validation needs at least one level")
    rng = np.random.default_rng(seed)
    cases = []
    for b in batch_sizes:
        cases.append((f"B={b} mixed levels", rng.choice(lv, size=b)))
    for end in sorted({int(lv[0]), int(lv[-1])}):
        cases.append((f"B={max(batch_sizes)} level {end}", np.full(max(batch_sizes), end, dtype=np.int64)))
    return cases


def validate_onnx(
    onnx_path: str | os.PathLike,
    unet: torch.nn.Module,
    *,
    levels: Sequence[int],
    batch_sizes: Sequence[int] = (1, 2, 7),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    raise_on_mismatch: bool = True,
) -> ValidationReport:
    """Compare ``onnx_path`` with ``unet`` on seeded random inputs; raise one
    :class:`ValidationError` listing every mismatch (unless ``raise_on_mismatch`` is False)."""
    module = eps_module(unet)
    image_shape, num_classes = model_facts(unet)
    sess = cpu_session(onnx_path)
    rng = np.random.default_rng(seed)
    report = ValidationReport(atol, rtol)
    for name, lv in validation_cases(levels, batch_sizes, seed):
        b = lv.size
        x = rng.standard_normal((b, *image_shape)).astype(np.float32)
        feeds = {SAMPLE: x, TIMESTEP: lv}
        args = [torch.from_numpy(x), torch.from_numpy(lv)]
        if num_classes is not None:
            lab = rng.integers(0, num_classes, size=b).astype(np.int64)
            feeds[CLASS_LABELS] = lab
            args.append(torch.from_numpy(lab))
        with torch.no_grad():
            ref = module(*args).numpy()
        try:
            got = sess.run([EPS], feeds)[0]
        except Exception as e:  # onnxruntime's own error types
            report.mismatches.append(Mismatch(name, EPS, f"onnxruntime failed: {e}"))
            continue
        if got.shape != ref.shape:
            report.mismatches.append(Mismatch(name, EPS, f"shape {list(got.shape)}, torch gives {list(ref.shape)}"))
            continue
        if got.dtype != np.float32:
            report.mismatches.append(Mismatch(name, EPS, f"dtype {got.dtype}, expected float32"))
        if not np.all(np.isfinite(got)):
            report.mismatches.append(Mismatch(name, EPS, "contains NaN or Inf"))
            continue
        diff = np.abs(got.astype(np.float64) - ref)
        max_abs = float(diff.max())
        report.cases.append({"case": name, "batch": b, "levels": sorted(set(lv.tolist()))[:8], "max_abs_diff": max_abs})
        bad = diff > atol + rtol * np.abs(ref)
        if np.any(bad):
            report.mismatches.append(Mismatch(
                name, EPS, f"{int(bad.sum())} of {bad.size} values differ beyond atol={atol:g} + rtol={rtol:g}·|ref| "
                           f"(max |Δ| {max_abs:.3g}, shape {list(got.shape)})"))
    if report.mismatches and raise_on_mismatch:
        lines = "\n  ".join(str(m) for m in report.mismatches)
        raise ValidationError(f"{os.fspath(onnx_path)} disagrees with the torch model in "
                              f"{len(report.mismatches)} check(s):\n  {lines}")
    return report
