"""POST /v1/train and networked training: bad uploads never reach the trainer; 3 client
processes + 1 server on loopback; the server killed mid-training loses no acknowledged batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from collafuse.server.app import create_app
from collafuse.server.config import ServerConfig
from collafuse_edge.protocol import encode_tensor
from server_fixtures import TOKENS, auth, token_entries, token_toml

NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture
def own_run(run_dir, tmp_path) -> str:
    d = str(tmp_path / "run")
    shutil.copytree(run_dir, d)
    return d


def _x(rows=4, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, 1, 16, 16)).astype(np.float32)


def _hdr(client=0, batch="b1", level=None, labels=None, rows=4):
    lv = {0: 29, 1: 19, 2: 39}[client] if level is None else level
    h = {**auth(client), **NPY, "X-Collafuse-Batch-Id": batch, "X-Collafuse-Level": str(lv)}
    h["X-Collafuse-Labels"] = ",".join(str(i % 10) for i in range(rows)) if labels is None else labels
    return h


@pytest.fixture
async def client(aiohttp_client, own_run):
    cfg = ServerConfig(own_run, tokens=token_entries(), warmup=False, train=True, train_checkpoint_every=1,
                       max_train_rows=16)
    return await aiohttp_client(create_app(cfg))


async def test_upload_accept_replay_and_training(client):
    r = await client.post("/v1/train", data=encode_tensor(_x()), headers=_hdr())
    assert r.status == 200, await r.text()
    assert (await r.json())["accepted"] is True
    r = await client.post("/v1/train", data=encode_tensor(_x()), headers=_hdr())
    assert r.status == 409 and (await r.json())["error"]["code"] == "duplicate_batch"
    import asyncio

    before = (await (await client.get("/v1/info", headers=auth(0))).json())["model_version"]
    for _ in range(600):
        info = await (await client.get("/v1/info", headers=auth(0))).json()
        if info["training"]["trained_batches"] >= 1 and info["model_version"] != before:
            break
        await asyncio.sleep(0.1)
    assert info["training"]["trained_batches"] == 1 and info["training"]["step"] >= 1
    # inference picked up the new weights, named like every model version: the trainer's checkpoint
    assert info["model_version"] != before
    assert info["model_version"].split("@")[1].startswith(f"{info['training']['step']}:")
    r = await client.post("/v1/handoff", json={"n": 1, "labels": [0], "seed": 1}, headers=auth(0))
    assert r.status == 200


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "dtype", "rows", "level", "labels_missing",
                                  "labels_range", "labels_count", "batch_id", "content_type", "token", "junk"])
async def test_bad_uploads_are_refused(client, case):
    x, h = _x(), _hdr()
    body = None
    want = 400
    if case == "nan":
        x[0, 0, 0, 0] = np.nan
    elif case == "inf":
        x[1, 0, 3, 3] = np.inf
    elif case == "shape":
        x = np.zeros((4, 1, 8, 8), np.float32)
    elif case == "dtype":
        body = encode_tensor(np.zeros((4, 1, 16, 16), np.float16))
    elif case == "rows":
        x, h, want = _x(rows=17), _hdr(rows=17), 413
    elif case == "level":
        h, want = _hdr(level=19), 403  # client 1's level with client 0's token
    elif case == "labels_missing":
        del h["X-Collafuse-Labels"]
    elif case == "labels_range":
        h["X-Collafuse-Labels"] = "0,1,2,10"
    elif case == "labels_count":
        h["X-Collafuse-Labels"] = "0,1"
    elif case == "batch_id":
        h["X-Collafuse-Batch-Id"] = "../../etc/passwd"
    elif case == "content_type":
        h["Content-Type"], want = "application/json", 415
    elif case == "token":
        h["Authorization"], want = "Bearer wrong", 401
    elif case == "junk":
        body = b"\x93NUMPY junk"
    r = await client.post("/v1/train", data=body if body is not None else encode_tensor(x), headers=h)
    assert r.status == want, (case, await r.text())
    doc = await r.json()
    assert set(doc["error"]) == {"code", "message"}
    info = await (await client.get("/v1/info", headers=auth(0))).json()
    assert info["training"]["pending_batches"] == 0 and info["training"]["trained_batches"] == 0
    assert (await client.get("/healthz")).status == 200


async def test_training_disabled_is_a_clear_404(aiohttp_client, own_run):
    c = await aiohttp_client(create_app(ServerConfig(own_run, tokens=token_entries(), warmup=False)))
    r = await c.post("/v1/train", data=encode_tensor(_x()), headers=_hdr())
    assert r.status == 404 and (await r.json())["error"]["code"] == "training_disabled"


def _client_cmd(url, client, out, steps, seed):
    return [sys.executable, "-m", "collafuse.cli", "client-train", "--server", url, "--out", out,
            "--data", "digits", "--clients", "3", "--partition", "by-label", "--client-index", str(client),
            "--client-model", "tiny", "--steps", str(steps), "--batch-size", "8", "--upload-batch", "8",
            "--checkpoint-every", "5", "--device", "cpu", "--seed", str(seed)]


def test_three_clients_one_server_with_a_crash(own_run, tmp_path):
    """3 client processes + 1 server process; SIGKILL the server mid-training, restart it: the
    clients finish, and acknowledged batches = trained + pending (none lost, none twice)."""
    from server_fixtures import ServeProcess

    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml().replace("[server]", "[server]\ntrain = true\ntrain_checkpoint_every = 3"))
    srv = ServeProcess(own_run, str(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    steps = 24
    procs = [subprocess.Popen(_client_cmd(srv.url, i, str(tmp_path / f"c{i}"), steps, i),
                              env={**env, "COLLAFUSE_TOKEN": TOKENS[i]}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    # let some uploads land, then kill the server hard (no graceful checkpoint)
    spool = os.path.join(own_run, "server_training")
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not os.path.exists(os.path.join(spool, "LATEST")):
        time.sleep(0.2)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    srv2 = ServeProcess(own_run, str(cfg), timeout=180)  # same port is not needed: clients retry
    # clients keep retrying the old URL; restart them against the new one (they resume from their checkpoints)
    for p in procs:
        p.kill()
        p.wait()
    procs = [subprocess.Popen(_client_cmd(srv2.url, i, str(tmp_path / f"c{i}"), steps, i),
                              env={**env, "COLLAFUSE_TOKEN": TOKENS[i]}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import urllib.request

    def info():
        req = urllib.request.Request(srv2.url + "/v1/info", headers=auth(0))
        return json.load(urllib.request.urlopen(req, timeout=10))["training"]

    for _ in range(600):
        t = info()
        if t["pending_batches"] == 0:
            break
        time.sleep(0.2)
    rc, log = srv2.stop()
    assert rc == 0, log
    assert all(tok not in log for tok in TOKENS.values())
    from collafuse.checkpoint import latest_checkpoint, read_state

    meta = read_state(latest_checkpoint(spool))
    trained = set(meta["extra"]["trained"])
    expected = {f"{c}/step-{s}" for c in range(3) for s in range(1, steps + 1)}
    assert trained == expected  # every client step's upload trained exactly once
    losses = [json.loads(line) for line in open(os.path.join(tmp_path, "c0", "metrics.jsonl"))]
    assert losses and all(np.isfinite(x["client_loss"]) for x in losses)
