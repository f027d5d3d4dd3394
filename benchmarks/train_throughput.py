"""Server training throughput: images/s of `server_update` (the exact objective from disclosed x_h,
the same code the networked trainer runs), per model preset, batch size and precision.

    python benchmarks/train_throughput.py --out runs/bench-train                 # this CPU
    python benchmarks/train_throughput.py --device cuda --batch 256,1024 --bf16 --compile   # a GPU

Prints a table, writes JSON with the machine. Reference (H200, server preset): 6.8 k img/s
fp32 eager at B=256; 35.7 k img/s bf16 + torch.compile at B=1024. Target on a GPU: ≥ 30 k img/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext

import numpy as np
import torch

from collafuse.config import TrainConfig, client_preset, server_preset
from collafuse.config import RunConfig
from collafuse.objectives import Disclosure
from collafuse.train import new_model_state, server_update


def machine() -> dict:
    d = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
         "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def bench(preset: str, batch: int, device: str, bf16: bool, compile_: bool, seconds: float) -> dict:
    mcfg = {"server": server_preset, "client": client_preset}[preset](num_classes=10)
    cfg = RunConfig()
    ms = new_model_state("server", mcfg, TrainConfig(), device)
    if compile_:
        ms.model.forward = torch.compile(ms.model.forward)
    sched = cfg.schedule.build()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 16, 16)
    lab = torch.randint(0, 10, (batch,))
    ds = [Disclosure(0, 599, x, lab)]
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()

    def one():
        server_update(ms, ds, sched, cfg, gen, device, ctx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        one()
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"preset": preset, "batch": batch, "device": device, "bf16": bf16, "compile": compile_,
            "median_step_s": med, "images_per_s": batch / med, "steps_timed": len(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--presets", default="client,server")
    p.add_argument("--batch", default="64,256")
    p.add_argument("--bf16", action="store_true", help="also measure bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--seconds", type=float, default=10.0, help="timing budget per configuration")
    p.add_argument("--out", default="runs/bench-train")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    rows = []
    for preset in a.presets.split(","):
        for b in (int(v) for v in a.batch.split(",")):
            for bf16 in ([False, True] if a.bf16 else [False]):
                for comp in ([False, True] if a.compile else [False]):
                    r = bench(preset, b, a.device, bf16, comp, a.seconds)
                    rows.append(r)
                    print(f"{preset:7s} B={b:5d} bf16={bf16!s:5s} compile={comp!s:5s} "
                          f"{r['median_step_s'] * 1e3:9.1f} ms/step {r['images_per_s']:10.0f} img/s", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "train_throughput.json"), "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=2)
    print(f"machine: {machine()}\nwrote {os.path.join(a.out, 'train_throughput.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
