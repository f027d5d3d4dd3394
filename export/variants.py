"""Reduced-precision variants of an exported fp32 denoiser, their quality gate and their speed.

* ``fp16``: weights and activations in float16, inputs and outputs kept float32 (half the
  download; fast on GPUs, usually slower on CPUs). The timestep embedding (t·freq → sin/cos,
  arguments up to ~1000) stays float32: fp16 would round those arguments by up to 0.5 rad.
* ``int8``: static QDQ quantisation with onnxruntime, calibrated on the client's own data noised
  to its own levels (levels drawn evenly over k-1 … 0, as the sampler visits them). Only
  ``Conv`` is quantised by default: the normalisations and the attention are sensitive, and
  the convolutions hold most of the FLOPs.

Every variant must pass :func:`quality_gate` against the fp32 model (one denoiser call, and a
whole client loop from the same handoff samples and noise); :func:`measure_speed` decides
whether it may be called faster — only if it measured faster here.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from collafuse_edge.bench import time_runs
from collafuse_edge.bundle import CLASS_LABELS, EPS, SAMPLE, TIMESTEP
from collafuse_edge.sampler import SamplerConfig, finish
from collafuse_edge.schedule import Schedule

from .errors import ExportError, QualityGateError
from .validate import cpu_session


# ---------------------------------------------------------------------------------------------
# calibration / evaluation inputs


@dataclass(frozen=True)
class ClientInputs:
    """Denoiser inputs the client will really see: its images noised to its levels."""

    sample: np.ndarray  # [N, C, H, W] float32, x_t = q(x_t | x0)
    timestep: np.ndarray  # [N] int64 in [0, k)
    class_labels: np.ndarray | None  # [N] int64

    def batches(self, size: int) -> Iterable[dict]:
        for a in range(0, len(self.timestep), size):
            feeds = {SAMPLE: self.sample[a:a + size], TIMESTEP: self.timestep[a:a + size]}
            if self.class_labels is not None:
                feeds[CLASS_LABELS] = self.class_labels[a:a + size]
            yield feeds


def client_inputs(
    schedule: Schedule,
    client_levels: int,
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int | None,
    n: int,
    seed: int,
) -> ClientInputs:
    """``n`` inputs: images drawn from ``images`` ``[M,C,H,W]`` (in [-1, 1]), levels stratified
    over ``0 … client_levels-1``, fresh noise; all from ``seed``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(images), size=n)
    # stratified: one level per equal-width bin, so every part of the client's range is covered
    edges = np.linspace(0, client_levels, n + 1)
    t = np.minimum(np.floor(edges[:-1] + rng.random(n) * np.diff(edges)), client_levels - 1).astype(np.int64)
    t = rng.permutation(t)
    x0 = images[idx].astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    x = schedule.add_noise(x0, eps, t).astype(np.float32)
    lab = None
    if num_classes is not None:
        lab = labels[idx].astype(np.int64) if labels is not None else rng.integers(0, num_classes, n).astype(np.int64)
    return ClientInputs(x, t, lab)


def handoff_samples(schedule: Schedule, client_levels: int, images: np.ndarray, labels: np.ndarray | None,
                    num_classes: int | None, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` samples at the handoff level k-1 drawn by q(x_{k-1} | x0) from ``images``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(images), size=n)
    x0 = images[idx].astype(np.float32)
    x = schedule.add_noise(x0, rng.standard_normal(x0.shape).astype(np.float32), client_levels - 1)
    lab = None
    if num_classes is not None:
        lab = labels[idx].astype(np.int64) if labels is not None else rng.integers(0, num_classes, n).astype(np.int64)
    return x.astype(np.float32), lab


# ---------------------------------------------------------------------------------------------
# conversions


def _timestep_embedding_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes between the ``timestep`` input and the sin/cos of its embedding."""
    producers = {out: n for n in model.graph.node for out in n.output}
    trig = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    ancestors: set[str] = set()
    stack = [i for n in trig for i in n.input]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or node.name in ancestors:
            continue
        ancestors.add(node.name)
        stack.extend(node.input)
    return sorted(ancestors | {n.name for n in trig})


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the fp16 variant of ``src`` to ``dst`` (float32 I/O kept)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):  # the converter blocks nodes by name
        if not node.name:
            node.name = f"node_{i}"
    keep = _timestep_embedding_nodes(model)
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    onnx.save(half, str(dst))
    return {"kept_fp32_nodes": len(keep), "keep_io_types": True}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


@dataclass(frozen=True)
class Int8Options:
    op_types: tuple[str, ...] = ("Conv",)
    per_channel: bool = True
    calibrate_method: str = "MinMax"  # "MinMax" | "Entropy" | "Percentile"
    # s8 activations: u8×s8 on AVX2 without VNNI saturates in int16 (vpmaddubsw); on a trained
    # client (c = 0.2) u8 gave ε rel-RMS 0.15 against 0.07 for s8
    activation_type: str = "QInt8"
    weight_type: str = "QInt8"


def to_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: ClientInputs,
            options: Int8Options = Int8Options(), batch: int = 16) -> dict:
    """Write the static-QDQ int8 variant of ``src`` to ``dst``, calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        feeds = list(calibration.batches(batch))
        quantize_static(
            str(pre), str(dst), _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel,
            activation_type=getattr(QuantType, options.activation_type),
            weight_type=getattr(QuantType, options.weight_type),
            calibrate_method=getattr(CalibrationMethod, options.calibrate_method),
            calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return {**asdict(options), "calibration_inputs": int(len(calibration.timestep)),
            "calibration_levels": [int(calibration.timestep.min()), int(calibration.timestep.max())]}


# ---------------------------------------------------------------------------------------------
# quality gate and speed


@dataclass(frozen=True)
class GateThresholds:
    eps_rel_rms: float  # ‖ε̂_variant − ε̂_fp32‖ / ‖ε̂_fp32‖ over client inputs
    sample_mean_abs: float  # mean |x0_variant − x0_fp32| after the whole client loop (range [-1, 1])


DEFAULT_GATES = {"fp16": GateThresholds(0.01, 0.01), "int8": GateThresholds(0.1, 0.05)}


def quality_gate(
    fp32_path: str | os.PathLike,
    variant_path: str | os.PathLike,
    *,
    precision: str,
    schedule: Schedule,
    client_levels: int,
    eval_inputs: ClientInputs,
    handoff: np.ndarray,
    handoff_labels: np.ndarray | None,
    thresholds: GateThresholds,
    sampler: SamplerConfig = SamplerConfig(),
    seed: int = 0,
    raise_on_failure: bool = True,
) -> dict:
    """Compare a variant with the fp32 model on one call and on a whole client loop."""
    ref, var = cpu_session(fp32_path), cpu_session(variant_path)
    num, den, max_abs = 0.0, 0.0, 0.0
    for feeds in eval_inputs.batches(64):
        a = ref.run([EPS], feeds)[0].astype(np.float64)
        b = var.run([EPS], feeds)[0].astype(np.float64)
        num += float(np.sum((b - a) ** 2))
        den += float(np.sum(a ** 2))
        max_abs = max(max_abs, float(np.max(np.abs(b - a))))

    def denoiser(sess):
        def run(x, t, lab):
            feeds = {SAMPLE: x, TIMESTEP: t}
            if lab is not None:
                feeds[CLASS_LABELS] = lab
            return sess.run([EPS], feeds)[0]
        return run

    x_ref = finish(denoiser(ref), schedule, handoff, client_levels, handoff_labels, sampler, seed=seed)
    x_var = finish(denoiser(var), schedule, handoff, client_levels, handoff_labels, sampler, seed=seed)
    d = np.abs(x_var.astype(np.float64) - x_ref)
    mse = float(np.mean(d ** 2))
    result = {
        "precision": precision,
        "eps_rel_rms": float(np.sqrt(num / max(den, 1e-30))),
        "eps_max_abs": max_abs,
        "eval_inputs": int(len(eval_inputs.timestep)),
        "sample_mean_abs": float(d.mean()),
        "sample_max_abs": float(d.max()),
        "sample_psnr_db": float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf"),
        "sample_images": int(handoff.shape[0]),
        "sample_levels": int(client_levels),
        "sampler": sampler.sampler,
        "thresholds": asdict(thresholds),
    }
    result["passed"] = bool(result["eps_rel_rms"] <= thresholds.eps_rel_rms
                            and result["sample_mean_abs"] <= thresholds.sample_mean_abs)
    if not result["passed"] and raise_on_failure:
        raise QualityGateError(
            f"the {precision} variant fails the quality gate against fp32: ε rel-RMS "
            f"{result['eps_rel_rms']:.3g} (limit {thresholds.eps_rel_rms:g}), sample mean |Δ| "
            f"{result['sample_mean_abs']:.3g} (limit {thresholds.sample_mean_abs:g}); ship fp32, or "
            f"relax the gate knowingly"
        )
    return result


def measure_speed(fp32_path: str | os.PathLike, variant_path: str | os.PathLike, image_shape: tuple[int, ...],
                  num_classes: int | None, batches: tuple[int, ...] = (1, 16), threads: int = 0,
                  budget_s: float = 2.0, margin: float = 0.05) -> dict:
    """Median CPU latency of both models per batch size; ``faster`` only when the variant beat
    fp32 by more than ``margin`` at every batch size."""
    from collafuse_edge.bench import machine_description

    sessions = {"fp32": cpu_session(fp32_path, threads), "variant": cpu_session(variant_path, threads)}
    rows = []
    for b in batches:
        rng = np.random.default_rng(0)
        feeds = {SAMPLE: rng.standard_normal((b, *image_shape)).astype(np.float32),
                 TIMESTEP: np.full(b, 10, np.int64)}
        if num_classes is not None:
            feeds[CLASS_LABELS] = np.zeros(b, np.int64)
        row = {"batch": b}
        for name, sess in sessions.items():
            secs = time_runs(lambda: sess.run([EPS], feeds), runs=500, warmup=5, budget_s=budget_s)
            row[f"{name}_ms"] = float(np.median(secs) * 1e3)
        rows.append(row)
    faster = all(r["variant_ms"] < (1 - margin) * r["fp32_ms"] for r in rows)
    parts = ", ".join(f"B={r['batch']}: {r['variant_ms']:.2f} ms vs fp32 {r['fp32_ms']:.2f} ms" for r in rows)
    return {
        "provider": "CPUExecutionProvider",
        "threads": threads or "default",
        "machine": machine_description(),
        "rows": rows,
        "faster_than_fp32": faster,
        "summary": (f"faster than fp32 on the export machine ({parts})" if faster else
                    f"NOT faster than fp32 on the export machine's CPU ({parts}); for smaller downloads "
                    f"(or GPUs), not for speed"),
    }


def check_precision(precision: str) -> None:
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"precision must be fp32, fp16 or int8; got {precision!r}")
