"""First ``collafuse-edge generate`` on a freshly installed bundle, with and without
``collafuse-edge warmup`` ahead of it (the CPU path: the optimised-graph cache).

Contenders, side by side in one run, each a fresh process timed from spawn to exit, in
interleaved rounds (load drift on a shared machine hits all alike):

* ``cold generate``: an empty cache folder, the first generate (optimises the graph, saves it);
* ``warmup``: an empty cache folder, ``collafuse-edge warmup --batch 1``;
* ``generate after warmup``: the first generate in the folder that warmup filled.

Process start-up noise on a busy machine can hide the difference, so the part warmup removes —
opening the session with an empty cache (optimise the graph, save it) against opening it with
the cache warmup filled — is also timed in one process, interleaved.

The model is the client preset (conditional, 16×16×1), exported at c = 0.2 of T = 1000; one
image is finished from a saved handoff with the default sampler (DDIM, 20 client steps).

    python benchmarks/edge_warmup.py                  # writes runs/bench-edge/edge_warmup.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-edge/edge_warmup.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be positive integers")
    return args


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited with {r.returncode}: {r.stderr[-1500:]}")
    return wall


def make_bundle(work: Path) -> str:
    import torch

    from collafuse.config import client_preset
    from collafuse.export.exporter import ExportConfig, export_bundle
    from collafuse.models import build_unet
    from collafuse_edge.schedule import Schedule

    torch.manual_seed(0)
    unet = build_unet(client_preset(num_classes=10)).eval()
    bundle = str(work / "bundle")
    export_bundle(unet, Schedule.create(1000), 0.2, bundle, config=ExportConfig(measure_speed=False))
    return bundle


def in_process(bundle: str, work: Path, repeats: int, threads: int) -> dict[str, list[float]]:
    """Session open with an empty graph cache vs with the entry warmup leaves, plus one model call."""
    from collafuse_edge import EdgeRuntime, SessionConfig
    from collafuse_edge.noise import initial_noise

    def open_and_call(cache: Path) -> float:
        t0 = time.perf_counter()
        rt = EdgeRuntime.open(bundle, SessionConfig(intra_op_threads=threads, graph_cache=str(cache)))
        b = rt.bundle
        rt.denoiser(initial_noise(0, (1, *b.image_shape)), np.full(1, b.handoff_level, np.int64), rt.labels_for(1))
        return time.perf_counter() - t0

    out: dict[str, list[float]] = {"session, empty cache": [], "session, after warmup": []}
    open_and_call(work / "ip-unmeasured")
    for i in range(repeats):
        cache = work / f"ip{i}"
        out["session, empty cache"].append(open_and_call(cache))
        out["session, after warmup"].append(open_and_call(cache))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from collafuse_edge.bench import format_table, machine_description

    work = Path(tempfile.mkdtemp(prefix="edge-warmup-"))
    cli = str(Path(sys.executable).parent / "collafuse-edge")
    bundle = make_bundle(work)
    handoff = work / "handoff.npy"
    np.save(handoff, np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32))
    base = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    threads = ["--threads", str(args.threads)]
    gen = [cli, "generate", "--bundle", bundle, "--from", str(handoff), "--out", str(work / "x.npy"), "-q", *threads]
    warm = [cli, "warmup", "--bundle", bundle, "--batch", "1", "-q", *threads]
    timed(gen, {**base, "XDG_CACHE_HOME": str(work / "unmeasured")})  # bytecode compiled once, as pip does
    rows: dict[str, list[float]] = {"cold generate": [], "warmup": [], "generate after warmup": []}
    load_before = os.getloadavg()[0]
    for i in range(args.repeats):
        cold = {**base, "XDG_CACHE_HOME": str(work / f"cold{i}")}
        warmed = {**base, "XDG_CACHE_HOME": str(work / f"warm{i}")}
        rows["cold generate"].append(timed(gen, cold))
        rows["warmup"].append(timed(warm, warmed))
        rows["generate after warmup"].append(timed(gen, warmed))
    session = in_process(bundle, work, args.repeats * 4, args.threads)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    table = [{"what": k, "median_s": round(med[k], 3), "vs_cold": round(med[k] / med["cold generate"], 2),
              "runs_s": " ".join(f"{v:.2f}" for v in rows[k])} for k in rows]
    machine = machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {platform.machine()}; load {load_before:.2f} → "
          f"{os.getloadavg()[0]:.2f}; {args.threads} thread(s); medians of {args.repeats} interleaved rounds")
    print(format_table(table, ["what", "median_s", "vs_cold", "runs_s"]))
    smed = {k: float(np.median(v)) for k, v in session.items()}
    print(format_table([{"in process": k, "median_ms": round(1e3 * smed[k], 1),
                         "vs_empty": round(smed[k] / smed["session, empty cache"], 2)} for k in session],
                       ["in process", "median_ms", "vs_empty"]))
    saved = med["cold generate"] - med["generate after warmup"]
    print(f"warmup saves the first generate {saved:.3f} s ({med['generate after warmup'] / med['cold generate']:.2f}× "
          f"its cold time)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from collafuse_edge.files import atomic_write_json

    atomic_write_json(out, {"machine": machine, "threads": args.threads, "repeats": args.repeats,
                            "median_s": med, "runs_s": rows, "first_generate_saved_s": saved,
                            "session_median_s": smed, "session_runs_s": session,
                            "load_before": load_before, "load_after": os.getloadavg()[0]})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
