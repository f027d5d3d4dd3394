"""``collafuse demo``: the whole story on the embedded digits, sized for ~10 minutes on 2 cores.

train (3 clients, by-label non-IID, c = 0.6) → split-sample a grid per client → plots and a
JSON report in the output folder. Later stages (export → server → edge client over HTTP,
metrics) run when those packages are present.
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
        steps, bs = dc.steps or 450, 32
    return RunConfig(
        data=DataConfig("digits", 16, 3, "by-label", 0.2, dc.seed),
        schedule=ScheduleConfig(1000, "linear"),
        cut_ratios=(0.6, 0.6, 0.6),
        client_model=client,
        server_model=server,
        train=TrainConfig(steps=steps, batch_size=bs, lr=1e-3 if not dc.quick else 1e-3, ema_decay=0.995,
                          seed=dc.seed, device="auto", log_every=10, checkpoint_every=max(steps // 2, 1)),
    )


def plot_losses(metrics_path: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for r in rows for k in r if k.endswith("_loss")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key.replace("_loss", ""))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("split training losses")
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_png)


def run_demo(dc: DemoConfig) -> dict:
    import torch

    from collafuse_edge.images import save_images

    from .checkpoint import load_run
    from .generate import SampleConfig, sample_client, to_numpy
    from .train import train

    t0 = time.perf_counter()
    os.makedirs(dc.out, exist_ok=True)
    run_dir = os.path.join(dc.out, "run")
    cfg = demo_run_config(dc)
    if os.path.exists(os.path.join(run_dir, "config.json")):
        import shutil

        shutil.rmtree(run_dir)
    print(f"[1/4] training 3 clients + server on the digits ({cfg.train.steps} steps) → {run_dir}")
    res = train(cfg, run_dir)
    print("[2/4] split sampling (server levels 999…600, client levels 599…0)")
    run = load_run(run_dir)
    sc = SampleConfig(n=16, sampler="ddim", server_steps=40, client_steps=25, seed=dc.seed)
    grids, report_clients = [], []
    for c in range(cfg.data.num_clients):
        s = sample_client(run, c, sc)
        imgs = to_numpy(s.images)
        path = os.path.join(dc.out, f"samples_client{c}.png")
        save_images(path, imgs)
        grids.append(imgs)
        report_clients.append({"client": c, "cut_ratio": cfg.cut_ratios[c], "handoff_level": s.handoff_level,
                               "samples": os.path.basename(path)})
    save_images(os.path.join(dc.out, "samples.png"), np.concatenate(grids))
    print("[3/4] metrics: quality (FD/KD in classifier space), disclosure, reconstruction attack, client cost")
    from .evaluate import demo_report

    metrics = demo_report(run_dir) if not dc.quick else None
    print("[4/4] plots and report")
    plot_losses(os.path.join(run_dir, "metrics.jsonl"), os.path.join(dc.out, "losses.png"))
    report = {
        "wall_s": time.perf_counter() - t0,
        "train": {"steps": res.step, "wall_s": res.wall_s, "steps_per_s": res.steps_per_s, "last": res.last},
        "device": str(next(run.server.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "clients": report_clients,
        "metrics": metrics,
        "outputs": {"grid": "samples.png", "losses": "losses.png", "run": "run"},
    }
    atomic_write_json(os.path.join(dc.out, "report.json"), report)
    return report
