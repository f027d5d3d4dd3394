"""The networked lifecycle with real processes on loopback, as docs/operations.md walks it:

sites train over HTTP (``collafuse client-train``) while ``collafuse serve --train`` trains the
server from their uploads → a serving process without ``--train`` serves what was trained → each
site exports its own model → the torch-free edge CLI generates through the server, equal to
in-process split sampling of those same weights."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import numpy as np

from server_fixtures import TOKENS, ServeProcess, auth, token_toml

STEPS = 6


def _site(url: str, client: int, out: str) -> list[str]:
    return [sys.executable, "-m", "collafuse.cli", "client-train", "--server", url, "--out", out, "--data", "digits",
            "--clients", "3", "--partition", "by-label", "--client-index", str(client), "--client-model", "tiny",
            "--steps", str(STEPS), "--batch-size", "8", "--upload-batch", "8", "--checkpoint-every", "3",
            "--device", "cpu", "--seed", str(client)]


def _info(url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/info", headers=auth(0)), timeout=30) as r:
        return json.load(r)


def test_sites_train_server_serves_it_sites_export_devices_generate(run_dir, tmp_path):
    from collafuse.checkpoint import latest_checkpoint, load_run, model_version, read_state
    from collafuse.sampling import split_sample

    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    train_cfg = tmp_path / "train.toml"
    train_cfg.write_text(token_toml().replace("[server]", "[server]\ntrain = true\ntrain_checkpoint_every = 2\n"
                                                          "train_batch_rows = 8"))
    serve_cfg = tmp_path / "serve.toml"
    serve_cfg.write_text(token_toml())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sites = [str(tmp_path / f"site{c}") for c in range(2)]

    # 1. sites train over HTTP; the server trains from their uploads
    trainer = ServeProcess(run, str(train_cfg), "--no-warmup", timeout=180)
    try:
        procs = [subprocess.Popen(_site(trainer.url, c, sites[c]), env={**env, "COLLAFUSE_TOKEN": TOKENS[c]},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert all("x_h at level" in o for o in outs), outs
        for _ in range(600):
            if _info(trainer.url)["training"]["pending_batches"] == 0:
                break
            import time

            time.sleep(0.1)
    finally:
        rc, log = trainer.stop()  # graceful: the final checkpoint
    assert rc == 0, log
    trained_ckpt = latest_checkpoint(os.path.join(run, "server_training"))
    trained = set(read_state(trained_ckpt)["extra"]["trained"])
    assert trained == {f"{c}/step-{s}" for c in range(2) for s in range(1, STEPS + 1)}  # uploaded = trained

    # 2. each site exports the model it trained (its own run directory)
    bundles = []
    for c in range(2):
        out = str(tmp_path / f"bundle{c}")
        r = subprocess.run([sys.executable, "-m", "collafuse.cli", "export", "--run", sites[c], "--client", str(c),
                            "--out", out, "--no-speed"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        bundles.append(out)

    # 3. serving without --train serves the trained weights; 4. devices generate through it
    server = ProcessGuard(ServeProcess(run, str(serve_cfg), "--no-warmup", timeout=180))
    try:
        want = model_version(run, trained_ckpt)[0]
        assert _info(server.p.url)["model_version"] == want
        served = load_run(run)
        assert served.model_version == want
        for c in range(2):
            site = load_run(sites[c])
            k = served.config.client_levels[c]
            labels = [2 * c, 2 * c + 1, 2 * c]  # by-label shares: the site's own classes
            ref = split_sample(served.server, site.clients[c], served.schedule, k, 3, shape=(1, 16, 16),
                               labels=labels, server_labels=labels, seed=5, sampler="ddim", server_steps=10,
                               client_steps=5)
            out = str(tmp_path / f"gen{c}.npy")
            r = subprocess.run([sys.executable, "-m", "collafuse_edge.cli", "generate", "--bundle", bundles[c],
                                "--server", server.p.url, "-n", "3", "--seed", "5", "--labels",
                                ",".join(map(str, labels)), "--sampler", "ddim", "--server-steps", "10",
                                "--client-steps", "5", "--out", out], capture_output=True, text=True,
                               env={**env, "COLLAFUSE_TOKEN": TOKENS[c]}, timeout=300)
            assert r.returncode == 0, r.stderr
            np.testing.assert_allclose(np.load(out), ref.images.numpy(), rtol=0, atol=1e-4)

        # 5. the site's own run samples and evaluates in torch with the server's levels over HTTP
        site_env = {**env, "COLLAFUSE_TOKEN": TOKENS[0]}
        out = str(tmp_path / "torch0.npy")
        r = subprocess.run([sys.executable, "-m", "collafuse.cli", "sample", "--run", sites[0], "--server", server.p.url,
                            "-n", "3", "--seed", "5", "--sampler", "ddim", "--server-steps", "10", "--client-steps", "5",
                            "--out", out], capture_output=True, text=True, env=site_env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert want in r.stdout  # it names the served model version
        from collafuse.generate import client_labels

        site0 = load_run(sites[0])
        lab = client_labels(site0, 0, 3)  # what sample picks: the site's own classes
        ref = split_sample(served.server, site0.clients[0], served.schedule, served.config.client_levels[0], 3,
                           shape=(1, 16, 16), labels=lab, server_labels=lab, seed=5, sampler="ddim", server_steps=10,
                           client_steps=5)
        np.testing.assert_allclose(np.load(out), ref.images.numpy(), rtol=0, atol=1e-4)
        r = subprocess.run([sys.executable, "-m", "collafuse.cli", "sample", "--run", sites[0], "-n", "3",
                            "--out", str(tmp_path / "x.npy")], capture_output=True, text=True, env=site_env, timeout=300)
        assert r.returncode == 2 and "--server URL" in r.stderr, r.stderr  # a site's run has no server model
        ev = str(tmp_path / "eval0")
        r = subprocess.run([sys.executable, "-m", "collafuse.cli", "evaluate", "--run", sites[0], "--server",
                            server.p.url, "-n", "8", "--disclosed", "8", "--kd-subsets", "3", "--sample-steps", "8",
                            "--latency", "none", "--out", ev], capture_output=True, text=True, env=site_env, timeout=600)
        assert r.returncode == 0, r.stderr
        rep = json.loads(open(os.path.join(ev, "report.json")).read())
        (c0,) = rep["clients"]
        assert c0["client"] == 0 and c0["quality"]["fd"] is not None
        assert c0["attack_training_chain"] is None  # the server's weights are not at the site
    finally:
        server.close()


class ProcessGuard:
    def __init__(self, p: ServeProcess):
        self.p = p

    def close(self) -> None:
        rc, log = self.p.stop()
        assert rc == 0, log
