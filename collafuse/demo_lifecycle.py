"""``collafuse demo``'s default path: the networked lifecycle as separate processes on loopback.

1. the operator starts a run with untrained weights (``collafuse init``) and ``collafuse serve
   --train`` with one token per site;
2. three sites train their own models with ``collafuse client-train`` at the same time, uploading
   only x_h (and labels) while the server trains from the uploads;
3. each site exports its own model as an ONNX bundle (``collafuse export --run SITE``);
4. a serving process without ``--train`` serves what the server learned, and each site's
   torch-free edge CLI (``collafuse-edge generate``) generates through it; the images are checked
   against in-process split sampling of the same weights;
5. metrics, a loss plot and ``report.json``.

Every step is a real command a user runs (see ``report.json["commands"]``; tokens redacted).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import numpy as np

from .checkpoint import atomic_write_json

SITE_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # 4 processes share the cores


class DemoError(RuntimeError):
    """A step of the demo failed; the message carries the failing command's output tail."""


def _toml(conf: dict, tokens: list[str]) -> str:
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in conf.items()] + [""]
    for c, tok in enumerate(tokens):
        lines += ["[[tokens]]", f'name = "site-{c}"', f"client = {c}",
                  f'sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"', ""]
    return "\n".join(lines)


def _info(url: str, token: str) -> dict:
    req = urllib.request.Request(url + "/v1/info", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


class _Commands:
    """Runs CLI commands as subprocesses, logs each to ``logs/NAME.log`` and records it (redacted)."""

    def __init__(self, out: str):
        self.out = out
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.ran: list[str] = []

    def _record(self, cmd: list[str], env: dict) -> None:
        shown = ["collafuse" if c == "collafuse.cli" else "collafuse-edge" if c == "collafuse_edge.cli" else c
                 for c in cmd[2:]] if cmd[1:2] == ["-m"] else cmd
        prefix = "COLLAFUSE_TOKEN=… " if "COLLAFUSE_TOKEN" in env else ""
        self.ran.append(prefix + " ".join(shown))

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
        env = env or {}
        self._record(cmd, env)
        log = os.path.join(self.logs, f"{name}.log")
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **SITE_ENV, **env})
        return p, log

    def run_all(self, jobs: list[tuple[str, list[str], dict | None]], timeout: float = 900) -> None:
        """Run ``(name, cmd, env)`` jobs at the same time (as separate sites would) and wait for all;
        the first failure stops the rest and raises with its output."""
        started = [(len(self.ran), *self.start(name, cmd, env)) for name, cmd, env in jobs]
        deadline = time.monotonic() + timeout
        try:
            for i, p, log in started:
                try:
                    rc = p.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    raise DemoError(f"{self.ran[i]} took over {timeout:.0f} s; its output: {log}") from None
                if rc != 0:
                    raise DemoError(f"{self.ran[i]} failed with exit code {rc}:\n{_tail(log)}")
        finally:
            for _, p, _ in started:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _tail(path: str, chars: int = 2000) -> str:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    return text[-chars:]


def _last_line(path: str) -> str:
    lines = [ln for ln in _tail(path, 4000).replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_networked_demo(dc, cfg) -> dict:
    """The lifecycle for demo config ``dc`` and run config ``cfg`` (see the module docstring)."""
    import torch

    from collafuse_edge.images import save_images

    from .checkpoint import latest_checkpoint, load_run, model_version
    from .demo import loss_series, plot_losses
    from .generate import SampleConfig, client_labels, sample_client, to_numpy
    from .serve_process import ServeProcess, ServeProcessError
    from .train import init_run

    t0 = time.perf_counter()
    out = os.path.abspath(dc.out)
    os.makedirs(out, exist_ok=True)
    n = cfg.data.num_clients
    server_run = os.path.join(out, "server-run")
    sites = [os.path.join(out, f"site{c}") for c in range(n)]
    for d in [server_run, os.path.join(out, "bundles"), os.path.join(out, "logs"), *sites]:
        shutil.rmtree(d, ignore_errors=True)  # the demo's own outputs of an earlier run
    cmds = _Commands(out)
    py = [sys.executable, "-m", "collafuse.cli"]
    phases: dict[str, float] = {}
    steps, bs = cfg.train.steps, cfg.train.batch_size
    quick_model = "tiny" if dc.quick else "client"

    print(f"[1/5] operator: a run with untrained weights ({server_run}) and `collafuse serve --train` with one "
          f"token per site")
    init_run(cfg, server_run)
    cmds.ran.append(f"collafuse init --out {server_run} --clients {n} --cut-ratio {cfg.cut_ratios[0]} "
                    f"--client-model {quick_model} --server-model {quick_model} --num-classes … --channels …")
    tokens = [secrets.token_urlsafe(24) for _ in range(n)]
    conf = os.path.join(out, "server.toml")
    server_opts = {"max_n": 16, "train_batch_rows": n * bs, "train_checkpoint_every": max(steps // 4, 1)}
    with open(conf + ".tmp", "w", encoding="utf-8") as f:
        f.write(_toml(server_opts, tokens))
    os.replace(conf + ".tmp", conf)
    os.chmod(conf, 0o600)

    print(f"[2/5] {n} sites train their own models at once ({steps} steps each), uploading only x_h and labels; "
          "the server trains from the uploads")
    t = time.perf_counter()
    trainer = ServeProcess(server_run, conf, "--train", log_path=os.path.join(out, "logs", "serve-train.log"),
                           log_level="info", env=SITE_ENV, timeout=300)
    cmds._record(trainer.cmd, {})
    try:
        trainer.wait_ready()
        procs = []
        for c in range(n):
            cmd = py + ["client-train", "--server", trainer.url, "--out", sites[c], "--data", cfg.data.source,
                        "--clients", str(n), "--partition", cfg.data.partition, "--client-index", str(c),
                        "--client-model", quick_model, "--steps", str(steps), "--batch-size", str(bs),
                        "--upload-batch", str(bs), "--lr", f"{cfg.train.lr:g}",
                        "--ema-decay", f"{cfg.train.ema_decay:g}", "--checkpoint-every", str(max(steps // 2, 1)),
                        "--seed", str(dc.seed), "--device", "cpu"]
            procs.append(cmds.start(f"site{c}-train", cmd, {"COLLAFUSE_TOKEN": tokens[c]}))
        for c, (p, log) in enumerate(procs):
            if p.wait(3600) != 0:
                for q, _ in procs:
                    q.kill()
                raise DemoError(f"site {c}'s client-train failed (exit {p.returncode}):\n{_tail(log)}")
            print(f"      site {c}: {_last_line(log)}")
        deadline = time.monotonic() + 600
        while (pending := _info(trainer.url, tokens[0])["training"]["pending_batches"]) > 0:
            if time.monotonic() > deadline:
                raise DemoError(f"the server still had {pending} uploads to train after 10 minutes; see "
                                f"{trainer.log_path}")
            time.sleep(0.5)
    finally:
        rc = trainer.close()  # graceful: the final checkpoint
    if rc != 0:
        raise DemoError(f"collafuse serve --train exited with {rc}:\n{_tail(trainer.log_path)}")
    trained_ckpt = latest_checkpoint(os.path.join(server_run, "server_training"))
    if trained_ckpt is None:
        raise DemoError(f"the server wrote no training checkpoint; see {trainer.log_path}")
    version, trained_step = model_version(server_run, trained_ckpt)
    phases["networked_training_s"] = time.perf_counter() - t

    print("[3/5] each site exports the model it trained as a validated ONNX bundle")
    t = time.perf_counter()
    bundles = [os.path.join(out, "bundles", f"site{c}") for c in range(n)]
    cmds.run_all([(f"site{c}-export", py + ["export", "--run", sites[c], "--client", str(c), "--out", bundles[c],
                                            "--overwrite", "--no-speed"], None) for c in range(n)])
    phases["export_s"] = time.perf_counter() - t

    print(f"[4/5] a serving process (no --train) serves what the server learned ({version}); each site's "
          "torch-free edge CLI generates through it")
    t = time.perf_counter()
    served = load_run(server_run)  # the trainer's newest checkpoint: what serve loads too
    combined = replace(served, clients=[load_run(s).clients[c] for c, s in enumerate(sites)])
    sc = SampleConfig(n=16, sampler="ddim", server_steps=40, client_steps=25, seed=dc.seed)
    labels = [client_labels(combined, c, sc.n) for c in range(n)]
    server = ServeProcess(server_run, conf, log_path=os.path.join(out, "logs", "serve.log"), log_level="info",
                          env=SITE_ENV, timeout=300)
    cmds._record(server.cmd, {})
    try:
        server.wait_ready()
        served_version = _info(server.url, tokens[0])["model_version"]
        if served_version != version:
            raise DemoError(f"the server serves {served_version}, not the trained {version}")
        npys = [os.path.join(out, "logs", f"site{c}-images.npy") for c in range(n)]
        cmds.run_all([(f"site{c}-generate",
                       [sys.executable, "-m", "collafuse_edge.cli", "generate", "--bundle", bundles[c], "--server",
                        server.url, "-n", str(sc.n), "--seed", str(sc.seed), "--labels", ",".join(map(str, labels[c])),
                        "--sampler", sc.sampler, "--server-steps", str(sc.server_steps), "--client-steps",
                        str(sc.client_steps), "--out", npys[c]],
                       {"COLLAFUSE_TOKEN": tokens[c]}) for c in range(n)])
        http_images = [np.load(f) for f in npys]
    except ServeProcessError as e:
        raise DemoError(str(e)) from None
    finally:
        server.close()
    phases["serve_and_generate_s"] = time.perf_counter() - t
    report_clients = []
    for c in range(n):
        ref = to_numpy(sample_client(combined, c, sc, labels=labels[c]).images)  # in-process split sampling
        path = os.path.join(out, f"samples_site{c}.png")
        save_images(path, http_images[c])
        report_clients.append({
            "client": c, "cut_ratio": cfg.cut_ratios[c], "handoff_level": cfg.client_levels[c] - 1,
            "labels": [int(v) for v in labels[c]], "samples": os.path.basename(path), "bundle": bundles[c],
            "site_run": sites[c], "max_abs_diff_http_vs_in_process": float(np.max(np.abs(http_images[c] - ref))),
        })
    save_images(os.path.join(out, "samples.png"), np.concatenate(http_images))

    metrics = None
    if not dc.quick:
        print("[5/5] metrics (FD/KD in classifier space, disclosure, reconstruction attack, client cost), plots, "
              "report")
        from .evaluate import DEMO_EVAL, demo_report

        t = time.perf_counter()
        metrics = demo_report(combined, DEMO_EVAL)
        phases["metrics_s"] = time.perf_counter() - t
    else:
        print("[5/5] plots and report (--quick skips the metrics)")
    series = loss_series(os.path.join(server_run, "server_training", "metrics.jsonl"))
    for c in range(n):
        series |= loss_series(os.path.join(sites[c], "metrics.jsonl"), prefix=f"site {c} ")
    plot_losses(series, os.path.join(out, "losses.png"), "networked split training losses")
    report = {
        "path": "networked (separate processes over loopback HTTP)",
        "wall_s": time.perf_counter() - t0,
        "phases": phases,
        "train": {"steps_per_site": steps, "batch_size": bs, "server_steps": trained_step},
        "served_model_version": version,
        "sampler": {"sampler": sc.sampler, "server_steps": sc.server_steps, "client_steps": sc.client_steps,
                    "seed": sc.seed, "images_per_client": sc.n},
        "torch_threads": torch.get_num_threads(),
        "clients": report_clients,
        "metrics": metrics,
        "commands": cmds.ran,
        "outputs": {"grid": "samples.png", "losses": "losses.png", "server_run": "server-run",
                    "sites": [os.path.basename(s) for s in sites], "bundles": "bundles", "logs": "logs"},
    }
    atomic_write_json(os.path.join(out, "report.json"), report)
    return report
