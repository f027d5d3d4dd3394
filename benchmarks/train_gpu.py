"""Server training on a GPU, taken apart: where a `server_update` step's time goes (the
GPU target: ≥ 30 k img/s, server preset, B = 1024).

One model per precision, compiled once; the variants share it and differ only in what wraps
the model, timed in interleaved rounds:

* ``before``        the library as it was: diffusers EMA walking parameters in Python, AdamW (foreach)
* ``ema-foreach``   EMA as foreach ops
* ``library``       EMA foreach + fused AdamW (measured no faster than ``ema-foreach``, so the
                    library builds ``ema-foreach``)
* ``device-batch``  (diagnostic) ``library`` on a batch built once on the GPU: the host-side cost
                    of building each step's batch (noise, levels, re-noising) is what it saves
* ``fwd+bwd``       (diagnostic) forward + backward alone: the model's floor

then a torch.profiler look at ``library`` (top CUDA kernels, GPU-busy share of a step).

    python benchmarks/train_gpu.py --out runs/bench-train/train_gpu.json
    python benchmarks/train_gpu.py --device cpu --preset client --batch 64 --quick   # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from collafuse.config import RunConfig, TrainConfig, client_preset, server_preset
from collafuse.models import denoise
from collafuse.objectives import Disclosure, server_batch, server_loss
from collafuse.train import apply_update, new_model_state, server_update


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="server", choices=("server", "client"))
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--precisions", default="bf16,fp32",
                   help="each compiled once: bf16 (autocast) and/or fp32; a '-cl' suffix (bf16-cl) also puts "
                        "the model in channels-last memory format (cuDNN's NHWC kernels, no layout transposes)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    p.add_argument("--budget-s", type=float, default=200, help="skip what would start after this many seconds")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="eager (smoke runs on a CPU)")
    p.add_argument("--out", default="runs/bench-train/train_gpu.json")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.steps = 1, 2
    for prec in a.precisions.split(","):
        dtype, _, layout = prec.partition("-")
        if dtype not in ("bf16", "fp32") or layout not in ("", "cl"):
            p.error(f"--precisions: unknown entry {prec!r} (bf16, fp32, bf16-cl, fp32-cl)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    cfg = RunConfig()
    sched = cfg.schedule.build()
    mcfg = {"server": server_preset, "client": client_preset}[a.preset](num_classes=10)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 1, 16, 16)
    lab = torch.randint(0, 10, (a.batch,))
    ds = [Disclosure(0, 599, x, lab)]
    result = {"benchmark": "train_gpu", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpu else None},
              "preset": a.preset, "batch": a.batch, "rows": [], "profile": {}}
    for prec in a.precisions.split(","):
        if time.perf_counter() - t_start > a.budget_s:
            result.setdefault("skipped", []).append(prec)
            continue
        dtype, _, layout = prec.partition("-")
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        ms = new_model_state("server", mcfg, TrainConfig(), dev)
        if layout == "cl":  # before the optimiser and EMA below take the parameters
            ms.model.to(memory_format=torch.channels_last)
        if not a.no_compile:
            ms.model.forward = torch.compile(ms.model.forward)
        gen = torch.Generator().manual_seed(0)
        tc = TrainConfig()

        def variant(ema_foreach: bool, fused: bool):
            opt = torch.optim.AdamW(ms.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                    fused=(fused and gpu) or None)
            ema = EMAModel(ms.model.parameters(), decay=tc.ema_decay, foreach=ema_foreach)
            return opt, ema

        states = {"before": variant(False, False), "ema-foreach": variant(True, False), "library": variant(True, True)}

        def step_with(name):
            def run():
                ms.optimizer, ms.ema = states[name]
                server_update(ms, ds, sched, cfg, gen, dev, ctx)
            return run

        pre = server_batch(ds, sched, cfg.objective, gen, cfg.exact_weighting)
        pre = dataclasses.replace(pre, **{f.name: getattr(pre, f.name).to(dev) for f in dataclasses.fields(pre)
                                          if torch.is_tensor(getattr(pre, f.name))})

        def eps_fn(xx, tt, ll):
            with ctx:
                return denoise(ms.model, xx, tt, ll)

        def device_batch():
            ms.optimizer, ms.ema = states["library"]
            apply_update(ms, server_loss(eps_fn, pre, dev), cfg.train.grad_clip)

        def fwd_bwd():
            ms.model.zero_grad(set_to_none=True)
            server_loss(eps_fn, pre, dev).backward()

        jobs = {n: step_with(n) for n in states}
        jobs["device-batch"] = device_batch
        jobs["fwd+bwd"] = fwd_bwd
        t0 = time.perf_counter()
        for fn in jobs.values():  # compile (first), then warm every variant
            for _ in range(3):
                fn()
        sync()
        compile_s = time.perf_counter() - t0
        times = {n: [] for n in jobs}
        for _ in range(a.rounds):
            for n, fn in jobs.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    fn()
                sync()
                times[n].append((time.perf_counter() - t0) / a.steps)
        for n, v in times.items():
            med = float(np.median(v))
            result["rows"].append({"precision": prec, "compile": not a.no_compile, "variant": n, "ms_per_step": med * 1e3,
                                   "images_per_s": a.batch / med})
            print(f"{prec:5s} {n:13s} {med * 1e3:8.2f} ms/step {a.batch / med:10.0f} img/s", flush=True)
        result.setdefault("compile_and_warm_s", {})[prec] = compile_s
        if gpu and time.perf_counter() - t_start < a.budget_s:
            result["profile"][prec] = profile(jobs["library"], sync)
        _write(a.out, result)  # after each precision: a run cut short keeps what it measured
    print(f"wrote {a.out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def profile(fn, sync, steps: int = 5) -> dict:
    """GPU-busy share of a step and the top kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    sync()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / steps
    ka = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ka) / steps
    top = sorted(ka, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    out = {"wall_ms_per_step_profiled": wall * 1e3, "gpu_busy_ms_per_step": gpu_us / 1e3,
           "gpu_busy_share": gpu_us / 1e3 / (wall * 1e3),
           "top": [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1e3, "calls_per_step": e.count / steps}
                   for e in top],
           "cpu_top": [{"name": e.key[:90], "cpu_ms_per_step": e.self_cpu_time_total / steps / 1e3}
                       for e in sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]]}
    print(f"profiled: {out['wall_ms_per_step_profiled']:.1f} ms/step, GPU busy {out['gpu_busy_ms_per_step']:.1f} ms "
          f"({out['gpu_busy_share']:.0%})")
    for r in out["top"]:
        print(f"  {r['ms_per_step']:7.2f} ms  x{r['calls_per_step']:5.0f}  {r['name']}")
    print("  CPU:")
    for r in out["cpu_top"][:8]:
        print(f"  {r['cpu_ms_per_step']:7.2f} ms  {r['name']}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
