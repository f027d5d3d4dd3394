"""Bounded load test on loopback: many concurrent edge clients against one live server for a fixed time.

A real ``collafuse serve`` process on 127.0.0.1 (a throwaway run: one training step of a small
model, so the shapes and config are real; speed does not depend on the weights) and, in this
process, ``--clients`` asyncio edge clients, each with its own ``ServerClient`` connection pool,
calling ``generate_over_http`` back to back: ``POST /v1/handoff`` for the server's levels, then the
client's levels on the exported ONNX bundle (one onnxruntime session shared by all clients, run
in worker threads). ``--mode handoff`` skips the edge half and only fetches handoffs.

Beside them, ``--bad-clients`` misbehaving clients cycle through requests the server must refuse
cheaply and survive: a wrong token (401), no token (401), an oversized body (413), malformed JSON
(400), an out-of-range ``n`` (400), a valid request abandoned 20-200 ms in (the client closes
the connection while the server is computing it), and a body cut short (Content-Length promises
more than is sent, then the connection closes). The server must answer none of them with a 5xx
nor log an ERROR for them; the script exits 1 when it does (or on any other finding).

Reported: handoffs, handoffs/s, p50/p99 latency of the well-behaved clients (warm-up excluded),
their errors by kind (must be 0: they run with ``retries=0`` so nothing is hidden), the misbehaving
requests by outcome, and the server process's RSS (psutil when installed, else /proc/PID/status),
threads and open file descriptors sampled every ``--sample-interval`` s, with a leak verdict:
the least-squares slope of RSS over the second half of the measured window (MiB/min).

    python benchmarks/load_test.py                                   # 180 s, 32 clients (~4 min)
    python benchmarks/load_test.py --duration 600 --clients 64
    python benchmarks/load_test.py --quick                           # ~30 s smoke run

Writes ``OUT/load_test.json`` (machine, args, summary, time series) and ``OUT/load_test.png``
(RSS and throughput over time); the server's own log goes to ``OUT/server.log``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import sys
import tempfile
import time
import urllib.request
from collections import Counter

import numpy as np

from collafuse.errors import ServeProcessError
from collafuse.serve_process import ServeProcess

GOOD_TOKEN = "load-test-token"
WRONG_TOKEN = "not-a-token-of-this-server"
BAD_KINDS = ("wrong_token", "no_token", "oversized_body", "malformed_json", "bad_n", "abandoned", "truncated_body")
# What the server must answer to each misbehaving request (anything else counts as unexpected).
EXPECTED = {"wrong_token": {401}, "no_token": {401}, "oversized_body": {413}, "malformed_json": {400},
            # a request abandoned 20-200 ms in may be answered first (a tiny model is that fast): fine
            "bad_n": {400}, "abandoned": {"aborted", 200}, "truncated_body": {"closed"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-load", help="folder for JSON, PNG, server log and the throwaway run")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds after warm-up (default 180; quick 30)")
    p.add_argument("--warmup", type=float, default=None,
                   help="warm-up seconds, excluded from the stats (default 15; quick 3)")
    p.add_argument("--clients", type=int, default=None, help="well-behaved concurrent clients (default 32; quick 8)")
    p.add_argument("--bad-clients", type=int, default=None, help="misbehaving clients (default 2; quick 1)")
    p.add_argument("--bad-interval", type=float, default=0.25, help="seconds between a bad client's requests")
    p.add_argument("--mode", choices=("generate", "handoff"), default="generate",
                   help="generate: handoff + the edge levels on the ONNX bundle; handoff: server half only")
    p.add_argument("-n", type=int, default=1, help="images per request")
    p.add_argument("--timesteps", type=int, default=100, help="T of the throwaway run")
    p.add_argument("--cut-ratio", type=float, default=0.6, help="client share; the server runs (1-c)·T levels")
    p.add_argument("--server-preset", default="tiny", help="server model size: tiny | client | server")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    p.add_argument("--edge-threads", type=int, default=1, help="onnxruntime intra-op threads of the edge half")
    p.add_argument("--run", default=None, help="serve this run directory (its client 0) instead of a throwaway one")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS/throughput samples")
    p.add_argument("--leak-threshold", type=float, default=1.0,
                   help="MiB/min of second-half RSS growth above which a leak is suspected")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 s, 8 clients, 1 bad client, T=50")
    args = p.parse_args(argv)
    quick = {"duration": 30.0, "warmup": 3.0, "clients": 8, "bad_clients": 1}
    full = {"duration": 180.0, "warmup": 15.0, "clients": 32, "bad_clients": 2}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick and args.timesteps == 100:
        args.timesteps = 50
    if args.duration <= 0 or args.clients < 1 or args.bad_clients < 0 or args.warmup < 0:
        p.error("--duration must be > 0, --clients ≥ 1, --bad-clients ≥ 0, --warmup ≥ 0")
    return args


# ---------------------------------------------------------------------------------------------
# the run, the bundle and the server process


def make_run(out: str, args) -> str:
    """A throwaway run: one training step, so the checkpoint has the right shapes and config."""
    from collafuse.config import PRESETS, DataConfig, RunConfig, ScheduleConfig, TrainConfig, tiny_preset
    from collafuse.train import train

    run_dir = os.path.join(out, f"run-{args.server_preset}-T{args.timesteps}-c{args.cut_ratio}")
    if os.path.exists(os.path.join(run_dir, "LATEST")):
        return run_dir
    server_model = tiny_preset() if args.server_preset == "tiny" else PRESETS[args.server_preset](16)
    cfg = RunConfig(
        data=DataConfig("digits", 16, 1, "iid", 0.2, 0),
        schedule=ScheduleConfig(args.timesteps),
        cut_ratios=(args.cut_ratio,),
        client_model=tiny_preset(),
        server_model=server_model,
        train=TrainConfig(steps=1, batch_size=4, checkpoint_every=1, log_every=1, device="cpu"),
    )
    train(cfg, run_dir, progress=False)
    return run_dir


def make_bundle(run_dir: str, out: str) -> str:
    """Client 0's bundle (the real exporter), made once per run directory."""
    from collafuse.export.cli import export_client
    from collafuse.export.exporter import ExportConfig

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.abspath(run_dir))[-80:]
    path = os.path.join(out, "bundles", tag)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        try:  # the TorchScript exporter takes a third of the dynamo one's time; same validation after
            export_client(run_dir, 0, path, ExportConfig(measure_speed=False, exporter="legacy",
                                                         validation_batches=(1, 2)), overwrite=True)
        except Exception:  # noqa: BLE001 — e.g. a torch without it: the default exporter
            export_client(run_dir, 0, path, ExportConfig(measure_speed=False), overwrite=True)
    return path


class Server(ServeProcess):
    """``collafuse serve`` in a subprocess; its output goes to ``log_path``."""

    def __init__(self, run_dir: str, config: str, log_path: str, args):
        super().__init__(run_dir, config, "--max-n", str(max(8, args.n)), threads=args.threads, log_path=log_path,
                         env={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}, timeout=600)

    def wait_ready(self, timeout: float | None = None) -> None:
        try:
            super().wait_ready(timeout)
        except ServeProcessError as e:
            raise SystemExit(str(e)) from None

    def ready(self) -> bool:
        return super().ready(timeout=5)

    def metrics_text(self) -> str:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                return r.read().decode()
        except OSError:
            return ""

    def log(self) -> str:
        return self.output()

    def stop(self) -> int:
        return self.close()


def requests_by_status(metrics: str) -> dict[str, float]:
    """``collafuse_requests_total`` summed by status code, from the Prometheus text."""
    out: Counter = Counter()
    for m in re.finditer(r'^collafuse_requests_total\{([^}]*)\} ([0-9.e+-]+)$', metrics, re.M):
        status = re.search(r'status="([^"]*)"', m.group(1))
        out[status.group(1) if status else "?"] += float(m.group(2))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# process sampling


class ProcSampler:
    """RSS (MiB), threads, open fds and CPU seconds of one process: psutil if installed, else /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            import psutil

            self._p = psutil.Process(pid)
            self.source = f"psutil {psutil.__version__}"
        except ImportError:
            self._p = None
            self.source = f"/proc/{pid}/status"

    def sample(self) -> dict | None:
        try:
            if self._p is not None:
                with self._p.oneshot():
                    cpu = self._p.cpu_times()
                    return {"rss_mib": self._p.memory_info().rss / 2**20, "threads": self._p.num_threads(),
                            "fds": self._p.num_fds(), "cpu_s": cpu.user + cpu.system}
            fields = {}
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    fields[k] = v.strip()
            with open(f"/proc/{self.pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]),
                    "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
                    "cpu_s": (int(stat[11]) + int(stat[12])) / tick}
        except (OSError, KeyError, ValueError):
            return None  # the process is gone


def leak_fit(t_s: np.ndarray, rss: np.ndarray, t_from: float, t_to: float, threshold: float,
             handoffs_per_s: float) -> dict:
    """Least-squares RSS slope over [t_from, t_to] in MiB/min, with a verdict."""
    sel = (t_s >= t_from) & (t_s <= t_to)
    if sel.sum() < 3 or t_to - t_from < 30:
        return {"verdict": "window too short to judge", "samples": int(sel.sum())}
    slope, icpt = np.polyfit(t_s[sel] / 60.0, rss[sel], 1)
    growth = float(rss[sel][-1] - rss[sel][0])
    suspected = bool(slope > threshold and growth > 1.0)
    per_handoff = slope * 2**20 / 60.0 / handoffs_per_s if handoffs_per_s > 0 else float("nan")
    return {"window_s": [float(t_from), float(t_to)], "samples": int(sel.sum()),
            "slope_mib_per_min": float(slope), "intercept_mib": float(icpt),
            "growth_mib": growth, "bytes_per_handoff": float(per_handoff), "threshold_mib_per_min": threshold,
            "verdict": "leak suspected" if suspected else "no leak evident"}


# ---------------------------------------------------------------------------------------------
# clients


async def good_client(c: int, url: str, runtime, args, t0: float, t_end: float, done: list, errors: Counter) -> None:
    from collafuse_edge.http_client import ClientConfig, ServerClient, generate_over_http

    cfg = ClientConfig(url, token=GOOD_TOKEN, read_timeout_s=600, retries=0)
    seed = 1_000_000 * (c + 1)
    async with ServerClient(cfg) as server:
        info = await server.info()
        labels = list(range(args.n)) if info.labels_required else None
        while time.perf_counter() < t_end:
            seed += 1
            start = time.perf_counter()
            try:
                if runtime is None:
                    await server.handoff(args.n, labels, seed=seed)
                else:
                    await generate_over_http(runtime, server, args.n, labels, seed=seed)
            except Exception as e:  # noqa: BLE001 — every failure is counted by kind
                status = getattr(e, "status", None)
                errors[f"{type(e).__name__}" + (f" {status}" if status else "")] += 1
                await asyncio.sleep(0.5)
                continue
            end = time.perf_counter()
            done.append((start - t0, end - t0))


async def truncated_body(url: str, headers: dict, body: bytes) -> str:
    """POST /v1/handoff whose Content-Length exceeds the bytes sent; the connection closes mid-body."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /v1/handoff HTTP/1.1\r\nHost: {host}\r\n{head}Content-Length: {len(body) + 100}\r\n\r\n"
                 .encode() + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return "closed"


async def bad_client(c: int, url: str, args, t_end: float, outcomes: Counter) -> None:
    import aiohttp

    rng = random.Random(c)
    i = c
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/v1/info", headers={"Authorization": f"Bearer {GOOD_TOKEN}"}) as resp:
            labels_required = (await resp.json())["labels_required"]
        valid = {"n": args.n, **({"labels": list(range(args.n))} if labels_required else {})}
        while time.perf_counter() < t_end:
            kind = BAD_KINDS[i % len(BAD_KINDS)]
            i += 1
            headers = {"Authorization": f"Bearer {GOOD_TOKEN}", "Content-Type": "application/json"}
            body: bytes = json.dumps({**valid, "seed": rng.randrange(2**31)}).encode()
            if kind == "wrong_token":
                headers["Authorization"] = f"Bearer {WRONG_TOKEN}"
            elif kind == "no_token":
                del headers["Authorization"]
            elif kind == "oversized_body":
                body = json.dumps({"n": 1, "pad": "x" * (256 * 1024)}).encode()
            elif kind == "malformed_json":
                body = b'{"n": 1, "seed": '
            elif kind == "bad_n":
                body = json.dumps({"n": 10**6}).encode()
            try:
                if kind == "truncated_body":  # headers promise more body than is sent, then hang up
                    outcome = await truncated_body(url, headers, body)
                elif kind == "abandoned":
                    req = asyncio.ensure_future(session.post(url + "/v1/handoff", data=body, headers=headers))
                    await asyncio.sleep(rng.uniform(0.02, 0.2))
                    if req.done():
                        resp = req.result()
                        outcome = resp.status
                        resp.release()
                    else:
                        req.cancel()
                        try:
                            await req
                        except asyncio.CancelledError:
                            pass
                        outcome = "aborted"
                else:
                    async with session.post(url + "/v1/handoff", data=body, headers=headers) as resp:
                        await resp.read()
                        outcome = resp.status
            except Exception as e:  # noqa: BLE001
                outcome = type(e).__name__
            outcomes[(kind, outcome)] += 1
            await asyncio.sleep(args.bad_interval)


async def run_load(url: str, runtime, args, sampler: ProcSampler) -> dict:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = args.warmup + args.duration
    t0 = time.perf_counter()
    t_end = t0 + total
    done: list[tuple[float, float]] = []
    errors: Counter = Counter()
    outcomes: Counter = Counter()
    samples: list[dict] = []
    pbar = tqdm(total=round(total), unit="s", desc="load", disable=None, file=sys.stderr) if tqdm else None

    async def sample_loop() -> None:
        last_t, last_n = 0.0, 0
        own0 = resource.getrusage(resource.RUSAGE_SELF)
        while True:
            t = time.perf_counter() - t0
            s = sampler.sample()
            if s is not None:
                n = len(done)
                own = resource.getrusage(resource.RUSAGE_SELF)
                s.update(t_s=t, handoffs=n, handoffs_per_s=(n - last_n) / (t - last_t) if t > last_t else 0.0,
                         loadavg_1m=os.getloadavg()[0],
                         client_cpu_s=own.ru_utime + own.ru_stime - own0.ru_utime - own0.ru_stime)
                samples.append(s)
                last_t, last_n = t, n
                if pbar is not None:
                    pbar.n = min(round(t), pbar.total)
                    pbar.set_postfix(handoffs=n, rss=f"{s['rss_mib']:.0f}MiB", err=sum(errors.values()),
                                    refresh=False)
                    pbar.refresh()
            if t >= total:
                return
            await asyncio.sleep(min(args.sample_interval, max(0.05, total - t)))

    sampling = asyncio.ensure_future(sample_loop())
    tasks = [good_client(c, url, runtime, args, t0, t_end, done, errors) for c in range(args.clients)]
    tasks += [bad_client(c, url, args, t_end, outcomes) for c in range(args.bad_clients)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:  # a client that died outside its loop (e.g. GET /v1/info failed)
        if isinstance(r, BaseException):
            errors[f"client died: {type(r).__name__}"] += 1
    drained_s = time.perf_counter() - t_end
    await sampling
    final = sampler.sample()
    if final is not None:
        final.update(t_s=time.perf_counter() - t0, handoffs=len(done), handoffs_per_s=float("nan"),
                     loadavg_1m=os.getloadavg()[0], client_cpu_s=float("nan"))
        samples.append(final)
    if pbar is not None:
        pbar.close()
    return {"done": done, "errors": errors, "outcomes": outcomes, "samples": samples, "drained_s": drained_s}


# ---------------------------------------------------------------------------------------------
# report


def plot(path: str, samples: list[dict], done: np.ndarray, args, fit: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s["t_s"] for s in samples])
    rss = np.array([s["rss_mib"] for s in samples])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, rss, lw=1.2, label="server RSS")
    if "slope_mib_per_min" in fit:
        a, b = fit["window_s"]
        xs = np.array([a, b])
        ax1.plot(xs, fit["intercept_mib"] + fit["slope_mib_per_min"] * xs / 60.0, "r--", lw=1.2,
                 label=f"fit, 2nd half: {fit['slope_mib_per_min']:+.2f} MiB/min ({fit['verdict']})")
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title(title, fontsize=9)
    # throughput: completions per 5 s window (completion times of the well-behaved clients)
    total = args.warmup + args.duration
    w = float(np.clip(round(total / 36), 1, 5))
    if done.size:
        edges = np.arange(0.0, total + 1e-9, w)
        counts, _ = np.histogram(done[:, 1], bins=edges)
        ax2.plot((edges[:-1] + edges[1:]) / 2, counts / w, "-o", ms=2, lw=1.2,
                 label=f"handoffs/s ({w:.0f} s bins)")
        ax2.set_ylim(bottom=0)
    ax2.set_ylabel("handoffs/s")
    ax2.set_xlabel("seconds since start")
    ax2.legend(loc="lower right", fontsize=8)
    for ax in (ax1, ax2):
        ax.axvspan(0, args.warmup, color="0.9", lw=0)
        ax.grid(alpha=0.3)
    if args.warmup:
        ax2.text(args.warmup / 2, 0.92, "warm-up", transform=ax2.get_xaxis_transform(), ha="center",
                 fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from collafuse.server.config import hash_token
    from collafuse_edge.bench import format_table, machine_description

    os.makedirs(args.out, exist_ok=True)
    run_dir = args.run or make_run(args.out, args)
    cfg_path = os.path.join(tempfile.mkdtemp(prefix="load-test-"), "server.json")
    with open(cfg_path, "w") as f:
        json.dump({"tokens": [{"name": "load", "client": 0, "sha256": hash_token(GOOD_TOKEN)}]}, f)

    load_before = os.getloadavg()
    server = Server(run_dir, cfg_path, os.path.join(args.out, "server.log"), args)
    sampler = ProcSampler(server.pid)
    try:
        runtime = None
        if args.mode == "generate":  # exported while the server boots
            from collafuse_edge import EdgeRuntime
            from collafuse_edge.session import SessionConfig

            runtime = EdgeRuntime.open(make_bundle(run_dir, args.out), session=SessionConfig(
                providers=("cpu",), intra_op_threads=args.edge_threads))
        server.wait_ready()
        print(f"server pid {server.pid} at {server.url}; {args.clients} clients + {args.bad_clients} misbehaving, "
              f"{args.warmup:.0f} s warm-up + {args.duration:.0f} s, mode {args.mode}", flush=True)
        res = asyncio.run(run_load(server.url, runtime, args, sampler))
        ready_after = server.ready()
        metrics = server.metrics_text()
        by_status = requests_by_status(metrics)
        server_side = {}
        for name in ("collafuse_handoff_seconds_sum", "collafuse_handoff_seconds_count",
                     "collafuse_batch_rows_sum", "collafuse_batch_rows_count",
                     "collafuse_step_seconds_sum", "collafuse_step_seconds_count"):
            m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M)
            server_side[name] = float(m.group(1)) if m else float("nan")
    finally:
        rc = server.stop()
    log = server.log()
    tracebacks = log.count("Traceback (most recent call last)")
    error_lines = [ln for ln in log.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", ln)]
    # the exceptions named in the server's tracebacks (last lines of each chained block)
    exceptions = Counter(m.group(1) for m in re.finditer(r"^([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$", log, re.M))
    server_5xx = int(sum(v for k, v in by_status.items() if k.startswith("5")))

    # -- numbers over the measured window [warmup, warmup + duration] --------------------------
    done = np.array(res["done"], dtype=float).reshape(-1, 2)
    w0, w1 = args.warmup, args.warmup + args.duration
    in_win = done[(done[:, 1] >= w0) & (done[:, 1] <= w1)] if done.size else done
    lat = (in_win[:, 1] - in_win[:, 0]) * 1e3 if in_win.size else np.array([np.nan])
    hps = len(in_win) / args.duration
    samples = res["samples"]
    t_s = np.array([s["t_s"] for s in samples])
    rss = np.array([s["rss_mib"] for s in samples])
    fit = leak_fit(t_s, rss, w0 + args.duration / 2, w1, args.leak_threshold, hps)
    at = lambda t: samples[int(np.argmin(np.abs(t_s - t)))]  # noqa: E731
    s_start, s_mid, s_end = at(w0), at(w0 + args.duration / 2), at(w1)
    cpu_server = (s_end["cpu_s"] - s_start["cpu_s"]) / max(s_end["t_s"] - s_start["t_s"], 1e-9)
    client_cpu = (s_end["client_cpu_s"] - s_start["client_cpu_s"]) / max(s_end["t_s"] - s_start["t_s"], 1e-9)
    bad_total = sum(res["outcomes"].values())
    bad_unexpected = {f"{k} → {o}": v for (k, o), v in res["outcomes"].items() if o not in EXPECTED[k]}
    good_errors = dict(res["errors"])

    summary = {
        "clients": args.clients, "duration_s": args.duration, "handoffs": int(len(in_win)),
        "handoffs_per_s": hps, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(np.max(lat)), "errors": int(sum(good_errors.values())),
        "bad_requests": bad_total, "bad_unexpected": int(sum(bad_unexpected.values())),
        "rss_start_mib": s_start["rss_mib"], "rss_mid_mib": s_mid["rss_mib"], "rss_end_mib": s_end["rss_mib"],
        "rss_peak_mib": float(rss.max()), "rss_slope_mib_per_min": fit.get("slope_mib_per_min", float("nan")),
        "threads_start": s_start["threads"], "threads_end": s_end["threads"],
        "fds_start": s_start["fds"], "fds_end": s_end["fds"],
        "server_cpu_cores": cpu_server, "client_cpu_cores": client_cpu,
        "leak_verdict": fit["verdict"], "server_ready_after": ready_after, "server_exit_code": rc,
        "server_tracebacks": tracebacks, "server_error_lines": len(error_lines), "server_5xx": server_5xx,
        "drain_s": res["drained_s"],
        # whole run, warm-up and misbehaving requests included (the server's /metrics)
        "server_mean_handoff_ms": 1e3 * server_side["collafuse_handoff_seconds_sum"]
        / max(server_side["collafuse_handoff_seconds_count"], 1),
        "server_mean_batch_rows": server_side["collafuse_batch_rows_sum"]
        / max(server_side["collafuse_batch_rows_count"], 1),
        "server_mean_step_ms": 1e3 * server_side["collafuse_step_seconds_sum"]
        / max(server_side["collafuse_step_seconds_count"], 1),
    }

    machine = machine_description()
    import aiohttp
    import torch

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort = None
    machine.update(torch=torch.__version__, onnxruntime=ort, aiohttp=aiohttp.__version__,
                   platform=platform.platform(), server_threads=args.threads, rss_source=sampler.source,
                   loadavg_before=load_before, loadavg_after=os.getloadavg())
    machine_line = (f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
                    f"torch {machine['torch']}, onnxruntime {ort}; load average before "
                    f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, after "
                    f"{machine['loadavg_after'][0]:.2f}/{machine['loadavg_after'][1]:.2f}/"
                    f"{machine['loadavg_after'][2]:.2f}")
    setup = (f"server preset '{args.server_preset}', T={args.timesteps}, c={args.cut_ratio}, n={args.n}, "
             f"mode {args.mode}, {args.threads} server torch thread(s); {args.clients} clients + "
             f"{args.bad_clients} misbehaving; {args.warmup:.0f} s warm-up + {args.duration:.0f} s measured")
    print()
    print(setup)
    print(machine_line)
    print(format_table([summary], ["clients", "duration_s", "handoffs", "handoffs_per_s", "p50_ms", "p99_ms",
                                   "max_ms", "errors", "bad_requests", "bad_unexpected"]))
    print(format_table([summary], ["rss_start_mib", "rss_mid_mib", "rss_end_mib", "rss_peak_mib",
                                   "rss_slope_mib_per_min", "threads_start", "threads_end", "fds_start",
                                   "fds_end", "server_cpu_cores", "client_cpu_cores"]))
    print(f"well-behaved errors by kind: {good_errors or 'none'}")
    print("misbehaving requests (kind → answer: count): "
          + ", ".join(f"{k} → {o}: {v}" for (k, o), v in sorted(res["outcomes"].items(), key=str)))
    if bad_unexpected:
        print(f"UNEXPECTED answers to misbehaving requests: {bad_unexpected}")
    print(f"server requests by status (its /metrics): {by_status}; server-side mean handoff "
          f"{summary['server_mean_handoff_ms']:.0f} ms (queue included), mean step "
          f"{summary['server_mean_step_ms']:.1f} ms over {summary['server_mean_batch_rows']:.1f} rows")
    if "slope_mib_per_min" in fit:
        print(f"leak check, RSS over the second half ({fit['samples']} samples): "
              f"{fit['slope_mib_per_min']:+.3f} MiB/min ({fit['bytes_per_handoff']:+.0f} B per handoff), "
              f"growth {fit['growth_mib']:+.1f} MiB — {fit['verdict']} (threshold {args.leak_threshold} MiB/min)")
    print(f"server after the load: ready={ready_after}, SIGTERM exit code {rc}; its log has {len(error_lines)} "
          f"ERROR lines, {tracebacks} tracebacks" + (f" naming {dict(exceptions)}" if exceptions else ""))

    result = {"args": vars(args), "machine": machine, "setup": setup, "summary": summary,
              "errors_by_kind": good_errors,
              "bad_requests": [{"kind": k, "answer": o, "count": v} for (k, o), v in
                               sorted(res["outcomes"].items(), key=str)],
              "bad_unexpected": bad_unexpected, "server_requests_by_status": by_status, "leak": fit,
              "server_log_errors": error_lines[:50], "server_log_exceptions": dict(exceptions),
              "latency_ms_percentiles": {str(q): float(np.percentile(lat, q)) for q in (1, 10, 50, 90, 99, 100)},
              "samples": samples}
    path = os.path.join(args.out, "load_test.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    if not args.no_plot:
        png = os.path.join(args.out, "load_test.png")
        title = (f"{args.clients} clients + {args.bad_clients} misbehaving, mode {args.mode}, server "
                 f"'{args.server_preset}' T={args.timesteps} c={args.cut_ratio} n={args.n}\n"
                 f"{machine['cpu']}, {machine['cores']} cores (shared), Python {machine['python']}, "
                 f"torch {machine['torch']}")
        plot(png, samples, done, args, fit, title)
        print(f"wrote {png}")
    findings = [msg for bad, msg in [
        (summary["errors"], f"{summary['errors']} errors of well-behaved clients"),
        (summary["bad_unexpected"], f"{summary['bad_unexpected']} unexpected answers to misbehaving requests"),
        (server_5xx, f"{server_5xx} 5xx answers"), (error_lines, f"{len(error_lines)} ERROR lines in the server log"),
        (not ready_after, "the server was not ready after the load"), (rc != 0, f"server exit code {rc}"),
        (fit["verdict"] == "leak suspected", "RSS leak suspected")] if bad]
    print("findings: " + ("; ".join(findings) if findings else "none"))
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
