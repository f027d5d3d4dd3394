"""Server throughput on a CUDA GPU (H100/H200): the server model per step, and the batching engine.

Part 0, correctness on the device: the keyed noise computed on the GPU against numpy's; the
batching engine on the GPU (eager fp32, TF32 off) against the torch split sampler on the CPU; and
a request batched with others against the same request served alone, for the fastest path.
Part 1, the denoiser alone (``collafuse.server.denoiser.TorchDenoiser``): ms per step and
img·steps/s at batch B for each accelerated path — eager fp32, eager bf16, CUDA graphs bf16,
torch.compile bf16 (and compile + CUDA graphs).
Part 2, the step-level batching engine (``collafuse.server.engine.StepEngine``, in-process, no
HTTP): C concurrent handoff requests of n=1 image each (T=1000, c=0.6: 400 server levels per
request) with the fastest path — img·steps/s, ms per step, and the host-side time of the keyed
noise draws, which run on the CPU.

The server model is the 6.5 M 'server' preset at 16×16×1, 10 classes, untrained (speed does
not depend on the weights).

    python benchmarks/server_gpu.py --out runs/bench-gpu                 # ~4–6 min on an H100
    python benchmarks/server_gpu.py --allow-cpu --quick                  # smoke test of the script on a CPU

Targets: ≥ 50 k img·steps/s with 256 concurrent requests; ≤ 1.5 ms per step for a lone request.
Reference (H200, an earlier measurement): eager 8.9 ms/step at B=1; CUDA graphs bf16 1.0 ms at B=1,
3.1 ms at B=256 (83 k img·steps/s); torch.compile bf16 8.7 ms at B=1024 (118 k img·steps/s).
Writes ``OUT/server_gpu.json`` with the GPU name, driver/CUDA/torch versions.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import sys
import time

import numpy as np

VARIANTS = {  # name → (precision, compile, cuda_graphs); compile mode from --compile-mode
    "eager-fp32": ("fp32", False, False),
    "eager-bf16": ("bf16", False, False),
    "graphs-bf16": ("bf16", False, True),
    "compile-bf16": ("bf16", True, False),
    "compile+graphs-bf16": ("bf16", True, True),
}
BAR_THROUGHPUT, BAR_LONE_MS, BAR_CONCURRENCY = 50_000, 1.5, 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-gpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--batches", default="1,16,64,256,1024", help="batch sizes for part 1")
    p.add_argument("--concurrency", default="1,16,64,256", help="concurrent requests for part 2")
    p.add_argument("--engine-variant", default="auto", help="variant for part 2; auto = fastest at B=256")
    p.add_argument("--check-variant", default="", help="variant for part 0's batched-vs-alone check "
                   "(default: the engine's)")
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--cut-ratio", type=float, default=0.6)
    p.add_argument("--preset", default="server", help="model preset: tiny | client | server")
    p.add_argument("--iters", type=int, default=50, help="timed steps per (variant, batch)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for the compile variants (the server's default, "
                        "max-autotune-no-cudagraphs, tunes for minutes per batch size)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining part-1 variants once this many seconds have passed")
    p.add_argument("--allow-cpu", action="store_true", help="run on a CPU (a smoke test of this script only)")
    p.add_argument("--quick", action="store_true", help="small sizes (for --allow-cpu smoke runs)")
    return p.parse_args(argv)


def gpu_description(torch) -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cpu_cores": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                 capability=f"{props.major}.{props.minor}")
        try:
            import subprocess

            d["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return d


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accel_for(variant: str, compile_mode: str):
    from collafuse.server.denoiser import AccelConfig

    precision, comp, graphs = VARIANTS[variant]
    return AccelConfig(precision, comp, graphs, compile_mode)


def bench_denoiser(torch, model, device, variant: str, batches, iters: int, compile_mode: str) -> list[dict]:
    from collafuse.server.denoiser import TorchDenoiser

    precision, comp, graphs = VARIANTS[variant]
    if device.type != "cuda" and (graphs or precision == "fp16"):
        return []
    # buckets = the measured sizes only, so compiling costs one graph per size
    den = TorchDenoiser(model, device, accel_for(variant, compile_mode), max(batches), tuple(batches))
    t0 = time.perf_counter()
    den.warmup()  # compiles / captures every bucket
    setup_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        x = torch.randn(b, *den.sample_shape, device=device)
        t = torch.randint(0, 1000, (b,), device=device)
        lab = torch.randint(0, 10, (b,), device=device)
        for _ in range(3):
            den(x, t, lab)
        sync(torch, device)
        t0 = time.perf_counter()
        for _ in range(iters):
            den(x, t, lab)
        sync(torch, device)
        ms = (time.perf_counter() - t0) / iters * 1e3
        rows.append({"variant": variant, "batch": b, "ms_per_step": ms, "img_steps_per_s": b / ms * 1e3,
                     "setup_s": setup_s})
        print(f"  {variant:<20} B={b:<5} {ms:8.2f} ms/step  {b / ms * 1e3:10.0f} img·steps/s", flush=True)
    return rows


async def bench_engine(torch, model, device, schedule, variant: str, concurrency, cut_ratio: float,
                       compile_mode: str) -> list[dict]:
    from collafuse.server.denoiser import TorchDenoiser
    from collafuse.server.engine import HandoffSpec, StepEngine
    from collafuse_edge.noise import PURPOSE_STEP, keyed_normal
    from collafuse_edge.schedule import client_level_count

    den = TorchDenoiser(model, device, accel_for(variant, compile_mode), max(concurrency), tuple(concurrency))
    den.warmup()
    k = client_level_count(cut_ratio, schedule.T)
    levels = schedule.T - k
    eng = StepEngine(den, schedule, den.sample_shape, device, conditional=den.conditional,
                     max_batch_rows=max(concurrency), max_queue=10 * max(concurrency))
    await eng.start()
    rows = []
    try:
        await eng.submit(HandoffSpec(1, 0, k, np.zeros(1, np.int64)))  # warm the engine path
        for c in concurrency:
            specs = [HandoffSpec(1, 1000 + i, k, np.array([i % 10])) for i in range(c)]
            steps0 = eng.steps_run
            t0 = time.perf_counter()
            await asyncio.gather(*(eng.submit(s) for s in specs))
            wall = time.perf_counter() - t0
            steps = eng.steps_run - steps0
            ids = torch.arange(c, device=device)  # one vectorised keyed-noise call for c rows, 1 level
            numel = int(np.prod(den.sample_shape))
            keyed_normal(ids, ids * 0 + 500, ids * 0, numel, PURPOSE_STEP)
            sync(torch, device)
            t1 = time.perf_counter()
            for _ in range(10):
                keyed_normal(ids + 1000, ids * 0 + 500, ids * 0, numel, PURPOSE_STEP)
            sync(torch, device)
            noise_ms = (time.perf_counter() - t1) * 1e3 / 10
            r = {"variant": variant, "concurrent": c, "server_levels": levels, "wall_s": wall, "steps": steps,
                 "ms_per_step": wall / steps * 1e3, "img_steps_per_s": c * levels / wall,
                 "noise_ms_per_step": noise_ms}
            rows.append(r)
            print(f"  engine {variant:<14} {c:>4} concurrent: {r['ms_per_step']:.2f} ms/step, "
                  f"{r['img_steps_per_s']:.0f} img·steps/s (keyed noise, 1 level: {noise_ms:.3f} ms)", flush=True)
    finally:
        await eng.close()
    return rows

async def _serve_all(engine_cls, den, schedule, device, specs, together: bool):
    from collafuse.server.engine import StepEngine

    eng = StepEngine(den, schedule, den.sample_shape, device, conditional=den.conditional,
                     max_batch_rows=den.max_rows, max_queue=64)
    await eng.start()
    try:
        if together:
            res = await asyncio.gather(*(eng.submit(s) for s in specs))
        else:
            res = [await eng.submit(s) for s in specs]
    finally:
        await eng.close()
    return [r.samples for r in res]


async def check_correctness(torch, device, fast_variant: str, compile_mode: str) -> dict:
    """Part 0: the GPU computes what the CPU reference computes."""
    from collafuse.config import PRESETS
    from collafuse.models import build_unet
    from collafuse.sampling import run_levels
    from collafuse.server.denoiser import TorchDenoiser
    from collafuse.server.engine import HandoffSpec, StepEngine
    from collafuse_edge.noise import initial_noise, keyed_normal
    from collafuse_edge.schedule import Schedule, client_level_count, server_timetable

    out = {}
    # a. keyed noise on the device vs numpy (both Philox4x32-10, float64 Box-Muller)
    R, m = 4096, 256
    seeds = np.arange(R, dtype=np.int64) * 7919 + 2**40
    lv, rows = np.arange(R, dtype=np.int64) % 1000, np.arange(R, dtype=np.int64) % 4
    ref = keyed_normal(seeds, lv, rows, m)
    got = keyed_normal(*(torch.from_numpy(a).to(device) for a in (seeds, lv, rows)), m).cpu().numpy()
    out["noise_max_abs_diff"] = float(np.abs(ref - got).max())
    out["noise_equal_fraction"] = float((ref == got).mean())
    # b. the engine on the device (eager fp32, no TF32) vs the torch split sampler on the CPU
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build_unet(PRESETS["server"](16, 1, 10)).eval()
    schedule = Schedule.create(100)
    k = client_level_count(0.6, schedule.T)
    specs = [HandoffSpec(n, seed, k, np.arange(n, dtype=np.int64) % 10) for n, seed in ((1, 3), (2, 4), (3, 5))]
    from collafuse.server.denoiser import AccelConfig

    den = TorchDenoiser(copy.deepcopy(model), device, AccelConfig("fp32"), 8)
    got = await _serve_all(StepEngine, den, schedule, device, specs, together=True)
    diffs = []
    for sp, g in zip(specs, got):
        x = torch.from_numpy(initial_noise(sp.seed, (sp.n, 1, 16, 16)))
        r = run_levels(model, schedule, x, server_timetable(schedule.T, k), sp.labels, seed=sp.seed).numpy()
        diffs.append(float(np.abs(r - g).max()))
    out["engine_fp32_vs_cpu_max_abs_diff"] = max(diffs)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    # c. batched vs alone on the fast path (padded buckets: the kernels may differ with the batch)
    den = TorchDenoiser(copy.deepcopy(model), device, accel_for(fast_variant, compile_mode), 8, (1, 2, 4, 8))
    den.warmup()
    specs = [HandoffSpec(1 + i % 2, 10 + i, k, np.array([i % 10] * (1 + i % 2))) for i in range(5)]
    together = await _serve_all(StepEngine, den, schedule, device, specs, together=True)
    alone = await _serve_all(StepEngine, den, schedule, device, specs, together=False)
    out["fast_variant"] = fast_variant
    out["batched_vs_alone_max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(together, alone))
    out["batched_vs_alone_equal"] = all(np.array_equal(a, b) for a, b in zip(together, alone))
    for key, v in out.items():
        print(f"  {key}: {v}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("server_gpu.py needs a CUDA GPU (torch sees none: torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on an H100/H200, or pass "
              "--allow-cpu --quick to smoke-test the script on a CPU; for CPU numbers use "
              "benchmarks/server_throughput.py.", file=sys.stderr)
        return 2
    if args.quick:
        args.batches, args.concurrency, args.iters = "1,4,16", "1,4,16", 5
        args.timesteps, args.preset = 50, "tiny"
    from collafuse.config import PRESETS
    from collafuse.models import build_unet
    from collafuse_edge.bench import format_table
    from collafuse_edge.schedule import Schedule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_unet(PRESETS[args.preset](16, 1, 10)).eval()
    schedule = Schedule.create(args.timesteps)
    batches = [int(b) for b in args.batches.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    machine = gpu_description(torch)
    print(f"device: {machine.get('gpu', 'cpu')}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"model preset '{args.preset}' ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "server_gpu.json")
    doc: dict = {"args": vars(args), "machine": machine}

    def save() -> None:  # after every part, so a run cut short still leaves its numbers
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)

    t_start = time.perf_counter()
    print("\npart 1: the denoiser per step", flush=True)
    steps_rows = doc["denoiser"] = []
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if time.perf_counter() - t_start > args.budget_s:
            print(f"  {v}: skipped (--budget-s {args.budget_s:.0f} s spent)", flush=True)
            steps_rows.append({"variant": v, "error": "skipped: time budget spent"})
            continue
        try:
            steps_rows += bench_denoiser(torch, model, device, v, batches, args.iters, args.compile_mode)
        except Exception as e:  # a path that fails on this stack is reported, not fatal
            print(f"  {v}: failed: {type(e).__name__}: {e}", flush=True)
            steps_rows.append({"variant": v, "error": f"{type(e).__name__}: {e}"})
        save()

    variant = args.engine_variant
    if variant == "auto":  # the fastest path at the largest batch the engine will see
        ok = [r for r in steps_rows if "error" not in r]
        target = max([b for b in batches if b <= max(concurrency)] or [min(batches)])
        cand = [r for r in ok if r["batch"] == target]
        variant = max(cand, key=lambda r: r["img_steps_per_s"])["variant"] if cand else "eager-fp32"

    print(f"\npart 0: correctness on {device.type} (fast path {args.check_variant or variant})", flush=True)
    try:
        doc["correctness"] = asyncio.run(check_correctness(torch, device, args.check_variant or variant,
                                                           args.compile_mode))
    except Exception as e:
        print(f"  failed: {type(e).__name__}: {e}", flush=True)
        doc["correctness"] = {"error": f"{type(e).__name__}: {e}"}
    save()

    print(f"\npart 2: the batching engine with {variant}, T={args.timesteps}, c={args.cut_ratio}", flush=True)
    engine_rows = doc["engine"] = asyncio.run(bench_engine(torch, model, device, schedule, variant, concurrency,
                                                           args.cut_ratio, args.compile_mode))
    save()

    print()
    print(format_table([r for r in steps_rows if "error" not in r],
                       ["variant", "batch", "ms_per_step", "img_steps_per_s", "setup_s"]))
    print()
    print(format_table(engine_rows, ["variant", "concurrent", "server_levels", "ms_per_step", "img_steps_per_s",
                                     "noise_ms_per_step"]))
    by = {r["concurrent"]: r for r in engine_rows}
    targets = doc["targets"] = {}
    if BAR_CONCURRENCY in by:
        targets["throughput_256"] = {"value": by[BAR_CONCURRENCY]["img_steps_per_s"], "target": BAR_THROUGHPUT,
                                  "passed": by[BAR_CONCURRENCY]["img_steps_per_s"] >= BAR_THROUGHPUT}
    if 1 in by:
        targets["lone_ms_per_step"] = {"value": by[1]["ms_per_step"], "target": BAR_LONE_MS,
                                    "passed": by[1]["ms_per_step"] <= BAR_LONE_MS}
    for name, b in targets.items():
        print(f"target {name}: {b['value']:.2f} (target {'≥' if 'throughput' in name else '≤'} {b['target']}) — "
              f"{'PASS' if b['passed'] else 'FAIL'}")
    save()
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
