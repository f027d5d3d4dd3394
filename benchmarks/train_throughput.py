"""Training throughput, two parts (``--what``):

* ``server``: images/s of `server_update` (the exact objective from disclosed x_h, the same code
  the networked trainer runs), per model preset, batch size and precision. Reference (H200, server
  preset): 6.8 k img/s fp32 eager at B=256; 35.7 k img/s bf16 + torch.compile at B=1024. Target on
  a GPU: ≥ 30 k img/s.
* ``experiment``: the experiment loop of the small models (tiny / small presets) that the
  collaboration study trains by the dozen. First a profile of one lone training step (forward,
  backward, clip, AdamW, EMA — :func:`collafuse.train.apply_update`): where the time goes. Then,
  side by side in interleaved rounds (so load from other jobs hits every contender alike): the
  models trained one after another (the loop the trainer runs) against one vmapped
  :class:`collafuse.ensemble.Ensemble` of E members. Reported: model-steps/s (one model updated
  on one batch), counted GFLOP/s (forward + backward per example, FlopCounterMode) and the share
  of the machine's fp32 peak, measured in the same rounds (torch.mm 1024³, best run).

    python benchmarks/train_throughput.py --what experiment --out docs/data/train_throughput_cpu.json   # this CPU
    python benchmarks/train_throughput.py --device cuda --batch 256,1024 --bf16 --compile   # a GPU

Prints a table, writes JSON with the machine.
"""
from __future__ import annotations

import argparse
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


def _median_times(jobs: dict, rounds: int, reps: dict) -> dict:
    """Interleaved rounds: each round times ``reps[name]`` calls of every job once."""
    times: dict = {k: [] for k in jobs}
    for fn in jobs.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            times[name].append((time.perf_counter() - t0) / reps[name])
    return times


def profile_step(mcfg, batch: int, device: str) -> dict:
    """Where one lone training step spends its time: torch.profiler's self CPU time by op family."""
    from torch.profiler import ProfilerActivity, profile

    ms, step = _lone(mcfg, batch, device)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    fam = {"convolution": ("conv",), "group norm": ("group_norm", "native_group_norm"),
           "matmul / linear": ("addmm", "mm", "bmm", "linear", "matmul"),
           "optimizer + EMA (foreach / elementwise updates)": ("_foreach", "lerp", "addcdiv", "addcmul", "sqrt"),
           "activation (SiLU)": ("silu",)}
    out = {k: 0.0 for k in fam}
    out["everything else (elementwise, copies, autograd)"] = 0.0
    total, n_ops = 0.0, 0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6 / 5
        total += t
        n_ops += ev.count / 5
        key = next((k for k, pats in fam.items() if any(p in ev.key for p in pats)), None)
        out[key or "everything else (elementwise, copies, autograd)"] += t
    return {"step_s": total, "ops_per_step": n_ops, "us_per_op": total / max(n_ops, 1) * 1e6,
            "share": {k: v / total for k, v in out.items()}}


def _lone(mcfg, batch: int, device: str):
    from collafuse.train import apply_update

    tcfg = TrainConfig()
    ms = new_model_state("m", mcfg, tcfg, device)
    g = torch.Generator().manual_seed(0)
    x, tgt = torch.randn(batch, 1, 16, 16, generator=g), torch.randn(batch, 1, 16, 16, generator=g)
    t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step():
        pred = ms.model(x, t, class_labels=y).sample
        apply_update(ms, ((pred - tgt) ** 2).mean(), tcfg.grad_clip)

    return ms, step


def experiment(presets: list[str], batch: int, members: list[int], rounds: int, device: str) -> dict:
    """Loop vs ensemble for the small presets, with the fp32 peak measured in the same rounds."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cut_ratio_sweep import model_config

    from collafuse.config import replace
    from collafuse.cost import FLOPS
    from collafuse.ensemble import Ensemble
    from collafuse.models import build_unet, count_params

    n = 1024
    a = torch.randn(n, n)
    peak_flop = 2 * n ** 3
    rows, profiles = [], {}
    for preset in presets:
        mcfg = replace(model_config(preset, 16), num_classes=10)
        fe = FLOPS.train(build_unet(mcfg))
        profiles[preset] = profile_step(mcfg, batch, device)
        jobs, reps, per_call = {}, {}, {}
        loop_e = max(min(members), 1)
        lone = [_lone(mcfg, batch, device)[1] for _ in range(loop_e)]

        def loop(steps=lone):
            for s in steps:
                s()

        jobs["loop"], reps["loop"], per_call["loop"] = loop, 1, loop_e
        g = torch.Generator().manual_seed(0)
        for E in members:
            ens = Ensemble([build_unet(mcfg) for _ in range(E)])
            x, tgt = torch.randn(E, batch, 1, 16, 16, generator=g), torch.randn(E, batch, 1, 16, 16, generator=g)
            t, y = torch.randint(0, 1000, (E, batch), generator=g), torch.randint(0, 10, (E, batch), generator=g)
            jobs[f"ensemble E={E}"] = (lambda ens=ens, x=x, t=t, y=y, tgt=tgt: ens.step(x, t, y, tgt))
            reps[f"ensemble E={E}"], per_call[f"ensemble E={E}"] = 1, E
        jobs["peak"], reps["peak"], per_call["peak"] = (lambda: torch.mm(a, a)), 5, 0
        times = _median_times(jobs, rounds, reps)
        peak = peak_flop / float(np.min(times["peak"]))
        base = None
        for name in jobs:
            if name == "peak":
                continue
            med = float(np.median(times[name]))
            msps = per_call[name] / med
            gflops = msps * batch * fe / 1e9
            base = base or msps
            rows.append({"preset": preset, "params": count_params(build_unet(mcfg)), "contender": name,
                         "members": per_call[name], "batch": batch, "median_call_s": med,
                         "model_steps_per_s": msps, "gflops": gflops, "peak_share": gflops * 1e9 / peak,
                         "speedup_vs_loop": msps / base, "train_mflop_per_example": fe / 1e6,
                         "rounds": rounds, "peak_gflops": peak / 1e9})
    return {"rows": rows, "profiles": profiles}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="server", help="server | experiment | server,experiment")
    p.add_argument("--exp-presets", default="tiny,small", help="experiment: model sizes")
    p.add_argument("--exp-batch", type=int, default=8, help="experiment: batch per model and step")
    p.add_argument("--exp-members", default="8,32", help="experiment: ensemble sizes (the loop runs min of them)")
    p.add_argument("--rounds", type=int, default=5, help="experiment: interleaved timing rounds")
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
    what = set(a.what.split(","))
    if not what or what - {"server", "experiment"}:
        raise SystemExit(f"--what takes server and/or experiment, got {a.what!r}")
    if a.exp_batch < 1 or a.rounds < 1:
        raise SystemExit("--exp-batch and --rounds must be ≥ 1")
    try:
        members = [int(v) for v in a.exp_members.split(",")]
    except ValueError:
        raise SystemExit(f"--exp-members takes integers like 8,32, got {a.exp_members!r}") from None
    if not members or min(members) < 1:
        raise SystemExit("--exp-members must be integers ≥ 1")
    result: dict = {"machine": machine(), "load_average_at_start": list(os.getloadavg())}
    from collafuse_edge.bench import format_table, machine_description

    result["machine"].update(machine_description())
    if "experiment" in what:
        exp = experiment(a.exp_presets.split(","), a.exp_batch, members, a.rounds, a.device)
        result["experiment"] = exp
        for preset, pr in exp["profiles"].items():
            print(f"{preset}: one lone training step at B={a.exp_batch}: {pr['step_s'] * 1e3:.1f} ms CPU in "
                  f"{pr['ops_per_step']:.0f} ops ({pr['us_per_op']:.0f} µs per op); " +
                  ", ".join(f"{k} {v:.0%}" for k, v in pr["share"].items()))
        print(format_table(exp["rows"], ["preset", "contender", "members", "batch", "median_call_s", "model_steps_per_s",
                                         "gflops", "peak_share", "speedup_vs_loop"]))
        print(f"fp32 matmul peak (best run): {exp['rows'][0]['peak_gflops']:.1f} GFLOP/s; load average "
              f"{result['load_average_at_start'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs "
              "slow every contender alike in interleaved rounds; the peak too, so a share of it is an upper bound)")
    rows = []
    for preset in (a.presets.split(",") if "server" in what else []):
        for b in (int(v) for v in a.batch.split(",")):
            for bf16 in ([False, True] if a.bf16 else [False]):
                for comp in ([False, True] if a.compile else [False]):
                    r = bench(preset, b, a.device, bf16, comp, a.seconds)
                    rows.append(r)
                    print(f"{preset:7s} B={b:5d} bf16={bf16!s:5s} compile={comp!s:5s} "
                          f"{r['median_step_s'] * 1e3:9.1f} ms/step {r['images_per_s']:10.0f} img/s", flush=True)
    result["rows"] = rows
    from collafuse_edge.files import atomic_write_json

    path = a.out if a.out.endswith(".json") else os.path.join(a.out, "train_throughput.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_json(path, result)
    print(f"machine: {result['machine']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
