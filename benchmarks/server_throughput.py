"""Server throughput on loopback: handoffs/s and p50/p99 latency vs concurrent clients, batching on/off.

A live ``collafuse serve`` process (one per mode) on 127.0.0.1; C concurrent edge clients
(``collafuse_edge.http_client``) each send R back-to-back ``POST /v1/handoff`` requests for n
images. "off" serves one request at a time (``--no-batching``); "on" merges every active
request into one forward per step (step-level batching). The server model is untrained (speed
does not depend on the weights); on a CPU the default is the 0.65 M 'client' preset, since the
6.5 M 'server' preset is too slow to sweep 64 clients on 2 cores (``--server-preset server`` runs it).

    python benchmarks/server_throughput.py --out runs/bench-server          # ~5 min on 2 cores
    python benchmarks/server_throughput.py --quick                          # ~1 min smoke run

Target: with 16 concurrent clients, batching gives ≥ 0.9 × the model-time ceiling
16 · t(B=1) / t(B=16) (the server model's forward timed in process at B = 1 and 16, same threads):
batching cannot beat what one B = 16 forward saves over sixteen B = 1 forwards. The original fixed
≥ 4× check is printed beside it.
Prints a table; writes ``OUT/server_throughput.json`` with the machine description.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
import urllib.request

import numpy as np

from collafuse.errors import ServeProcessError
from collafuse.serve_process import ServeProcess

TARGET_CLIENTS, FIXED_RATIO, CEILING_SHARE = 16, 4.0, 0.9


def model_ceiling(run_dir: str, threads: int, batch: int = TARGET_CLIENTS, repeats: int = 20) -> dict:
    """``batch · t(B=1) / t(B=batch)`` of the run's server model forward (median times), in process."""
    import torch

    from collafuse.checkpoint import load_run
    from collafuse.models import denoise

    torch.set_num_threads(threads)
    run = load_run(run_dir)
    shape = (run.data.channels, run.data.image_size, run.data.image_size)
    times = {}
    with torch.no_grad():
        for b in (1, batch):
            x = torch.randn(b, *shape)
            t = torch.full((b,), run.schedule.T - 1, dtype=torch.long)
            y = torch.zeros(b, dtype=torch.long) if run.config.server_conditioning == "label" else None
            for _ in range(3):
                denoise(run.server, x, t, y)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                denoise(run.server, x, t, y)
                ts.append(time.perf_counter() - t0)
            times[b] = float(np.median(ts))
    return {"t_b1_ms": times[1] * 1e3, f"t_b{batch}_ms": times[batch] * 1e3, "ceiling": batch * times[1] / times[batch]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-server", help="folder for the JSON (and the throwaway run)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    p.add_argument("--modes", default="off,on", help="batching modes to compare")
    p.add_argument("--requests", type=int, default=3, help="requests per client per measurement")
    p.add_argument("-n", type=int, default=1, help="images per request")
    p.add_argument("--timesteps", type=int, default=100, help="T of the throwaway run")
    p.add_argument("--cut-ratio", type=float, default=0.6, help="client share; the server runs (1-c)·T levels")
    p.add_argument("--server-preset", default="client", help="model size of the server: tiny | client | server")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server process (default 1: on a shared 2-core machine, two "
                        "OpenMP threads that wait on each other's core can be 10-100× slower)")
    p.add_argument("--max-batch-rows", type=int, default=256)
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 (server autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the server model")
    p.add_argument("--run", default=None, help="use this run directory instead of making a throwaway one")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, T=50, clients 1,4,16")
    return p.parse_args(argv)


def make_run(out: str, args) -> str:
    """A throwaway run: one training step, so the checkpoint has the right shapes and config."""
    from collafuse.config import PRESETS, DataConfig, RunConfig, ScheduleConfig, TrainConfig, tiny_preset
    from collafuse.train import train

    run_dir = os.path.join(out, f"run-{args.server_preset}-T{args.timesteps}")
    if os.path.exists(os.path.join(run_dir, "LATEST")):
        return run_dir
    cfg = RunConfig(
        data=DataConfig("digits", 16, 1, "iid", 0.2, 0),
        schedule=ScheduleConfig(args.timesteps),
        cut_ratios=(args.cut_ratio,),
        client_model=tiny_preset(),
        server_model=PRESETS[args.server_preset](16),
        train=TrainConfig(steps=1, batch_size=4, checkpoint_every=1, log_every=1, device="cpu"),
    )
    train(cfg, run_dir, progress=False)
    return run_dir


class Server(ServeProcess):
    def __init__(self, run_dir: str, config: str, batching: bool, args):
        extra = ["--max-batch-rows", str(args.max_batch_rows), "--max-n", str(min(64, args.max_batch_rows)),
                 "--precision", args.precision]
        if not batching:
            extra.append("--no-batching")
        if args.compile:
            extra.append("--compile")
        # Idle OpenMP threads sleep instead of spinning: on a machine shared with other work a spinning
        # thread steals the core its partner needs (set OMP_WAIT_POLICY yourself to override).
        super().__init__(run_dir, config, *extra, threads=args.threads,
                         env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
        try:
            self.wait_ready(600)
        except ServeProcessError as e:
            raise SystemExit(str(e)) from None

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self) -> None:
        self.close()


async def measure(url: str, token: str, clients: int, requests: int, n: int, seed0: int) -> dict:
    from collafuse_edge.http_client import ClientConfig, ServerClient

    lat: list[float] = []
    async with ServerClient(ClientConfig(url, token=token, read_timeout_s=3600)) as server:
        info = await server.info()
        labels = list(range(n)) if info.labels_required else None

        async def client(c: int) -> None:
            for r in range(requests):
                t0 = time.perf_counter()
                await server.handoff(n, labels, seed=seed0 + c * requests + r)
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    done = clients * requests
    steps = info.schedule.T - info.client_levels
    return {"clients": clients, "requests": done, "wall_s": wall, "handoffs_per_s": done / wall,
            "img_steps_per_s": done * n * steps / wall, "p50_ms": float(np.percentile(lat, 50)) * 1e3,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3, "server_levels": steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.server_preset, args.timesteps, args.clients, args.requests = "tiny", 50, "1,4,16", 2
    from collafuse.server.config import hash_token
    from collafuse_edge.bench import format_table, machine_description

    os.makedirs(args.out, exist_ok=True)
    run_dir = args.run or make_run(args.out, args)
    token = "bench-token"
    cfg_path = os.path.join(tempfile.mkdtemp(), "server.json")
    with open(cfg_path, "w") as f:
        json.dump({"tokens": [{"name": "bench", "client": 0, "sha256": hash_token(token)}]}, f)
    load_before = os.getloadavg()
    modes = args.modes.split(",")
    servers = {m: Server(run_dir, cfg_path, batching=(m == "on"), args=args) for m in modes}
    rows = []
    try:
        for s in servers.values():
            asyncio.run(measure(s.url, token, 2, 1, args.n, 10**9))  # warm-up: allocator, threads, caches
        # Modes alternate per concurrency level, so a shared machine's load drifts over both alike;
        # the idle server of the other mode uses no CPU meanwhile.
        for c in (int(v) for v in args.clients.split(",")):
            for mode, server in servers.items():
                before = (server.metric("collafuse_batch_rows_sum"), server.metric("collafuse_batch_rows_count"))
                r = asyncio.run(measure(server.url, token, c, args.requests, args.n, 1000 * c))
                rs, rc = server.metric("collafuse_batch_rows_sum"), server.metric("collafuse_batch_rows_count")
                r.update(mode=f"batching {mode}", mean_batch_rows=(rs - before[0]) / max(rc - before[1], 1),
                         loadavg_1m=os.getloadavg()[0])
                rows.append(r)
                print(f"  {r['mode']:<12} {c:>3} clients: {r['handoffs_per_s']:.2f} handoffs/s, "
                      f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, mean batch {r['mean_batch_rows']:.1f}",
                      flush=True)
    finally:
        for s in servers.values():
            s.stop()
    rows.sort(key=lambda r: (r["mode"], r["clients"]))
    by = {(r["mode"], r["clients"]): r for r in rows}
    for r in rows:
        off = by.get(("batching off", r["clients"]))
        if off and r["mode"] == "batching on":
            r["speedup_vs_off"] = r["handoffs_per_s"] / off["handoffs_per_s"]
    machine = machine_description()
    import torch

    machine.update(torch=torch.__version__, threads=args.threads, loadavg_before=load_before,
                   loadavg_after=os.getloadavg())
    cols = ["mode", "clients", "requests", "handoffs_per_s", "img_steps_per_s", "p50_ms", "p99_ms",
            "mean_batch_rows", "speedup_vs_off", "loadavg_1m"]
    print(f"\nserver model preset '{args.server_preset}', T={args.timesteps}, c={args.cut_ratio} "
          f"({rows[0]['server_levels']} server levels per handoff), n={args.n}, {args.precision}"
          f"{' + compile' if args.compile else ''}, {args.threads} torch threads")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average before {load_before[0]:.1f}")
    print(format_table(rows, cols))
    speedup = by.get(("batching on", TARGET_CLIENTS), {}).get("speedup_vs_off")
    ceiling = model_ceiling(run_dir, args.threads)
    verdict = fixed = None
    if speedup is not None:
        need = CEILING_SHARE * ceiling["ceiling"]
        verdict, fixed = speedup >= need, speedup >= FIXED_RATIO
        print(f"\nmodel-time ceiling at B = {TARGET_CLIENTS}: {ceiling['ceiling']:.2f}× "
              f"(t(B=1) {ceiling['t_b1_ms']:.2f} ms, t(B={TARGET_CLIENTS}) {ceiling[f't_b{TARGET_CLIENTS}_ms']:.2f} ms)")
        print(f"target: {TARGET_CLIENTS} clients, batching on/off = {speedup:.2f}× (≥ {CEILING_SHARE} × ceiling "
              f"= {need:.2f}×) — {'PASS' if verdict else 'FAIL'}; fixed ≥ {FIXED_RATIO}×: {'PASS' if fixed else 'FAIL'}")
    result = {"args": vars(args), "machine": machine, "rows": rows, "model_ceiling": ceiling,
              "batching_target": {"clients": TARGET_CLIENTS, "ratio": speedup, "ceiling": ceiling["ceiling"],
                                  "target": CEILING_SHARE * ceiling["ceiling"], "passed": verdict,
                                  "fixed_target": FIXED_RATIO, "fixed_passed": fixed}}
    path = os.path.join(args.out, "server_throughput.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
