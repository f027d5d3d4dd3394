"""``collafuse demo``: the whole story on the embedded digits, sized for ~10 minutes on 2 cores.

The default runs the networked lifecycle as separate processes (:mod:`collafuse.demo_lifecycle`):
``serve --train`` + three ``client-train`` sites → serving the trained weights → each site exports
its bundle → the torch-free edge CLI generates through the server. ``--in-process`` runs the
one-process simulation instead: train (3 clients, by-label non-IID, c = 0.6) → export → serve →
edge over HTTP. Both check the networked images against in-process split sampling and write
metrics, sample grids, plots and a JSON report in the output folder.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from .checkpoint import atomic_write_json
from .config import DataConfig, ModelConfig, RunConfig, ScheduleConfig, TrainConfig


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    steps: int | None = None
    seed: int = 0
    quick: bool = False  # seconds-long smoke run (CI)
    in_process: bool = False  # train in one process (the simulation) instead of sites over HTTP


def demo_run_config(dc: DemoConfig) -> RunConfig:
    """Demo-sized models: the client a small UNet, the server the 0.65 M 'client' preset (the
    full 6.5 M server preset needs a GPU to train in minutes)."""
    if dc.quick:
        client = ModelConfig(16, 1, (8, 16), 1, ("plain", "plain"), False, 4)
        server = ModelConfig(16, 1, (8, 16), 1, ("plain", "plain"), False, 4)
        steps, bs = dc.steps or 20, 8
    else:
        client = ModelConfig(16, 1, (32, 64), 1, ("plain", "plain"), True, 8)
        server = ModelConfig(16, 1, (32, 64), 1, ("plain", "plain"), True, 8)
        # the networked path trains the three sites and the server in four processes at once
        # (≈ 3 min for 320 steps on 2 cores), the in-process path one model after another
        steps, bs = dc.steps or (320 if dc.in_process else 720), 32
    return RunConfig(
        data=DataConfig("digits", 16, 3, "by-label", 0.2, dc.seed),
        schedule=ScheduleConfig(1000, "linear"),
        cut_ratios=(0.6, 0.6, 0.6),
        client_model=client,
        server_model=server,
        train=TrainConfig(steps=steps, batch_size=bs, lr=1e-3 if not dc.quick else 1e-3, ema_decay=0.995,
                          seed=dc.seed, device="auto", log_every=10, checkpoint_every=max(steps // 2, 1)),
    )


def plot_losses(series: dict[str, list[tuple[int, float]]], out_png: str, title: str = "split training losses") -> None:
    """One line per named series of (step, loss), log scale, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in sorted(series.items()):
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)


def loss_series(metrics_path: str, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, loss)]}`` of every ``*_loss`` key in a ``metrics.jsonl``."""
    rows = []
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    out: dict[str, list[tuple[int, float]]] = {}
    for key in sorted({k for r in rows for k in r if k.endswith("_loss")}):
        out[prefix + key.replace("_loss", "")] = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return out


def _serve_and_generate(run_dir: str, out: str, clients: int, sc, labels: list, bundles: list[str]) -> list:
    """Start ``collafuse serve`` (a real process, one token per client), then each client's
    torch-free edge runtime asks it for handoff samples over HTTP and finishes them locally."""
    import asyncio
    import hashlib
    import secrets

    from collafuse_edge import EdgeRuntime
    from collafuse_edge.http_client import ClientConfig, ServerClient, generate_over_http
    from collafuse_edge.sampler import SamplerConfig

    from .serve_process import ServeProcess

    tokens = [secrets.token_urlsafe(24) for _ in range(clients)]
    conf = os.path.join(out, "server.json")
    atomic_write_json(conf, {"tokens": [{"client": c, "name": f"client-{c}",
                                         "sha256": hashlib.sha256(t.encode()).hexdigest()}
                                        for c, t in enumerate(tokens)]})
    with ServeProcess(run_dir, conf, log_path=os.path.join(out, "server.log"), timeout=180) as server:
        url = server.url

        async def one(c: int) -> np.ndarray:
            rt = EdgeRuntime.open(bundles[c])
            async with ServerClient(ClientConfig(url, token=tokens[c])) as srv:
                return await generate_over_http(
                    rt, srv, sc.n, labels[c], seed=sc.seed, server_sampler=sc.sampler, server_steps=sc.server_steps,
                    sampler=SamplerConfig(sc.sampler, sc.client_steps))

        return [asyncio.run(one(c)) for c in range(clients)]


def _export(run_dir: str, client: int, out: str) -> str:
    import subprocess
    import sys

    bundle = os.path.join(out, "bundles", f"client{client}")
    r = subprocess.run([sys.executable, "-m", "collafuse.cli", "export", "--run", run_dir, "--client", str(client),
                        "--out", bundle, "--overwrite", "--no-speed"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"collafuse export failed for client {client}:\n{r.stderr[-2000:]}")
    return bundle


def run_demo(dc: DemoConfig) -> dict:
    """The networked lifecycle (default) or, with ``dc.in_process``, the one-process simulation."""
    if not dc.in_process:
        from .demo_lifecycle import run_networked_demo

        return run_networked_demo(dc, demo_run_config(dc))
    return run_in_process_demo(dc)


def run_in_process_demo(dc: DemoConfig) -> dict:
    import torch

    from collafuse_edge.images import save_images

    from .checkpoint import load_run
    from .generate import SampleConfig, client_labels, sample_client, to_numpy
    from .train import train

    t0 = time.perf_counter()
    os.makedirs(dc.out, exist_ok=True)
    run_dir = os.path.join(dc.out, "run")
    cfg = demo_run_config(dc)
    if os.path.exists(os.path.join(run_dir, "config.json")):
        import shutil

        shutil.rmtree(run_dir)
    n_clients = cfg.data.num_clients
    print(f"[1/5] training {n_clients} clients + server on the digits ({cfg.train.steps} steps) → {run_dir}")
    res = train(cfg, run_dir)
    run = load_run(run_dir)
    sc = SampleConfig(n=16, sampler="ddim", server_steps=40, client_steps=25, seed=dc.seed)
    labels = [client_labels(run, c, sc.n) for c in range(n_clients)]
    print("[2/5] exporting each client's denoiser as a validated ONNX bundle")
    bundles = [_export(run_dir, c, dc.out) for c in range(n_clients)]
    print("[3/5] serving the server's levels over HTTP; each edge client (no torch) generates through it")
    t_http = time.perf_counter()
    http_images = _serve_and_generate(run_dir, dc.out, n_clients, sc, labels, bundles)
    t_http = time.perf_counter() - t_http
    report_clients = []
    for c in range(n_clients):
        ref = to_numpy(sample_client(run, c, sc, labels=labels[c]).images)  # in-process split sampling
        path = os.path.join(dc.out, f"samples_client{c}.png")
        save_images(path, http_images[c])
        report_clients.append({
            "client": c, "cut_ratio": cfg.cut_ratios[c], "handoff_level": cfg.client_levels[c] - 1,
            "labels": [int(v) for v in labels[c]], "samples": os.path.basename(path), "bundle": bundles[c],
            "max_abs_diff_http_vs_in_process": float(np.max(np.abs(http_images[c] - ref))),
        })
    save_images(os.path.join(dc.out, "samples.png"), np.concatenate(http_images))
    metrics = None
    if not dc.quick:
        print("[4/5] metrics: quality (FD/KD in classifier space), disclosure, reconstruction attack, client cost")
        from .evaluate import demo_report

        metrics = demo_report(run_dir)
    print("[5/5] plots and report")
    plot_losses(loss_series(os.path.join(run_dir, "metrics.jsonl")), os.path.join(dc.out, "losses.png"))
    report = {
        "path": "in-process training, then serving and edge generation over loopback HTTP",
        "wall_s": time.perf_counter() - t0,
        "train": {"steps": res.step, "wall_s": res.wall_s, "steps_per_s": res.steps_per_s, "last": res.last},
        "networked_generation_s": t_http,
        "sampler": {"sampler": sc.sampler, "server_steps": sc.server_steps, "client_steps": sc.client_steps,
                    "seed": sc.seed, "images_per_client": sc.n},
        "device": str(next(run.server.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "clients": report_clients,
        "metrics": metrics,
        "outputs": {"grid": "samples.png", "losses": "losses.png", "run": "run", "bundles": "bundles",
                    "server_log": "server.log"},
    }
    atomic_write_json(os.path.join(dc.out, "report.json"), report)
    return report
