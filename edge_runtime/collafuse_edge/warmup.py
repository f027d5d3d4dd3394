"""``collafuse-edge warmup``: do the slow first-start work ahead of time, so the first
``generate`` on a device is fast.

What is slow the first time depends on the provider: on the CPU, onnxruntime optimises the graph
(saved by :class:`collafuse_edge.graph_cache.GraphCache` and loaded as is on later starts); with
TensorRT, the engines are built (minutes on a Jetson) and kept in the engine cache. Warm-up opens
the bundle's session with the same options ``generate`` uses, then calls the model once at each
batch size the device will use (each first call of a size also sets up that size's buffers and,
for TensorRT, is covered by the engine's optimisation profile up to ``--max-batch``), timing
every part, and reports where the caches are.

Example::

    r = warm_up("bundles/client0", SessionConfig(), batches=(1, 16))
    r["session_s"], r["graph_cache_hit"], r["calls"]
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .graph_cache import trt_engine_files
from .progress import QUIET, Progress
from .session import SessionConfig


def warm_up(bundle: str, session: SessionConfig, batches: Sequence[int] = (1,), *, max_batch: int = 64,
            trust: Sequence[str] | None = None, progress: Progress = QUIET) -> dict:
    """Open ``bundle`` with ``session`` and call its model once per batch size (then once more,
    to show the steady time); returns what happened, JSON-ready."""
    from .noise import initial_noise
    from .runtime import EdgeRuntime

    for b in batches:
        if b > max_batch:
            from .errors import InputError

            raise InputError(f"batch {b} is above --max-batch {max_batch}: generate never calls the model with "
                             f"more than --max-batch rows, so there is nothing to warm up there")
    t0 = time.perf_counter()
    with progress.task("opening the session (optimising the graph or building TensorRT engines on first use)",
                       summary=False) as t:
        rt = EdgeRuntime.open(bundle, session, max_batch=max_batch, trust=trust)
        t.finish(f"session started in {time.perf_counter() - t0:.2f} s on {', '.join(rt.denoiser.providers)}"
                 + (" (optimised graph loaded from the cache)" if rt.denoiser.graph_cache_hit else ""))
    session_s = time.perf_counter() - t0
    b = rt.bundle
    calls = []
    with progress.task("first model call per batch size", total=len(batches)) as t:
        for n in batches:
            x = initial_noise(0, (n, *b.image_shape))
            ts = np.full(n, b.handoff_level, dtype=np.int64)
            lab = rt.labels_for(n, None)
            c0 = time.perf_counter()
            rt.denoiser(x, ts, lab)
            first = time.perf_counter() - c0
            c0 = time.perf_counter()
            rt.denoiser(x, ts, lab)
            again = time.perf_counter() - c0
            calls.append({"batch": n, "first_ms": round(first * 1e3, 3), "second_ms": round(again * 1e3, 3)})
            t.advance(detail=f"(batch {n}: first {first * 1e3:.1f} ms, then {again * 1e3:.1f} ms)")
    den = rt.denoiser
    out = {
        "bundle": str(b.path),
        "providers": den.providers,
        "provider_notes": list(den.provider_notes),
        "session_s": round(session_s, 4),
        "graph_cache_hit": bool(den.graph_cache_hit),
        "graph_cache": session.graph_cache,
        "trt_cache_dir": None if den.trt_cache_dir is None else str(den.trt_cache_dir),
        "trt_first_build": bool(den.trt_first_build),
        "trt_engines": None if den.trt_cache_dir is None else len(trt_engine_files(den.trt_cache_dir)),
        "max_batch": max_batch,
        "calls": calls,
        "total_s": round(time.perf_counter() - t0, 4),
        "signed_by": rt.signed_by,
    }
    return out


__all__ = ["warm_up"]
