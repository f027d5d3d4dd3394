"""Latency of a bundle on this device: one denoiser call and one full client loop.

Used by ``collafuse-edge bench`` and by ``benchmarks/edge_latency.py``. Times are wall-clock
medians after warm-up (the first calls pay for allocation and, on TensorRT, engine builds).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .noise import initial_noise
from .sampler import SamplerConfig
from .runtime import EdgeRuntime, Handoff


@dataclass(frozen=True)
class Timing:
    what: str  # "call" (one denoiser evaluation) or "loop" (the whole client half)
    batch: int
    levels: int  # denoiser calls per timed run
    runs: int
    median_ms: float
    p90_ms: float

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch

    def to_dict(self) -> dict:
        return {**asdict(self), "per_image_ms": self.per_image_ms}


def time_runs(fn: Callable[[], object], *, runs: int, warmup: int = 3, budget_s: float | None = None) -> np.ndarray:
    """Seconds per call of ``fn`` over ``runs`` calls after ``warmup`` untimed ones; stops
    early (after at least 3 runs) when ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    out = []
    start = time.perf_counter()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if budget_s is not None and len(out) >= 3 and time.perf_counter() - start > budget_s:
            break
    return np.asarray(out)


def _timing(what: str, batch: int, levels: int, secs: np.ndarray) -> Timing:
    return Timing(what, batch, levels, int(secs.size), float(np.median(secs) * 1e3),
                  float(np.percentile(secs, 90) * 1e3))


def bench_runtime(
    rt: EdgeRuntime,
    batches: Sequence[int] = (1, 16),
    *,
    call_runs: int = 200,
    loop_runs: int = 5,
    sampler: SamplerConfig = SamplerConfig(),
    budget_s: float = 10.0,
) -> list[Timing]:
    """Per-call and per-loop timings of ``rt`` at each batch size (inputs: seeded noise)."""
    b = rt.bundle
    rows = []
    for n in batches:
        x = initial_noise(0, (n, *b.image_shape))
        t = np.full(n, b.handoff_level, dtype=np.int64)
        lab = rt.labels_for(n)
        rows.append(_timing("call", n, 1, time_runs(lambda: rt.denoiser(x, t, lab), runs=call_runs,
                                                    warmup=10, budget_s=budget_s)))
        h = Handoff(x, b.handoff_level, seed=0)
        levels = len(b.sampler_for(sampler).timetable(b.client_levels))
        rows.append(_timing("loop", n, levels, time_runs(lambda: rt.finish(h, lab, sampler=sampler),
                                                         runs=loop_runs, warmup=1, budget_s=budget_s)))
    return rows


def machine_description() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(),
            "system": platform.system(), "python": platform.python_version()}


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) over ``columns``."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
