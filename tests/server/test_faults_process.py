"""Fault injection with real ``collafuse serve`` processes on loopback (docs/reliability.md):
the server SIGKILLed in the middle of a handoff and restarted (the edge client retries and
completes, with the same samples), stalled or gone for good (the client fails clearly in bounded
time), and SIGKILLed in the middle of POST /v1/train uploads (no acknowledged batch is lost, none
is trained twice)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from collafuse_edge.errors import ServerRequestError
from collafuse_edge.http_client import ClientConfig, ServerClient
from server_fixtures import TOKENS, ServeProcess, auth, free_port, labels_for, reference_handoff, token_toml


@pytest.fixture
def config_file(tmp_path) -> str:
    p = tmp_path / "server.toml"
    p.write_text(token_toml())
    return str(p)


def test_server_killed_mid_handoff_then_restarted_or_gone(run_dir, loaded_run, config_file):
    port = free_port()
    srv = ServeProcess(run_dir, config_file, "--no-warmup", port=port, timeout=180)
    n, seed, labels = 4, 77, labels_for(4, 1)
    ref = reference_handoff(loaded_run, 0, n, labels, seed)
    cc = ClientConfig(srv.url, token=TOKENS[0], retries=60, backoff_s=0.1, max_backoff_s=0.5,
                      connect_timeout_s=2, read_timeout_s=30)
    result: dict = {}

    async def fetch(client: ServerClient) -> None:
        t0 = time.monotonic()
        h = await client.handoff(n, labels, seed)
        result.update(samples=h.samples, seconds=time.monotonic() - t0)

    async def scenario() -> None:
        async with ServerClient(cc) as client:
            await client.info()  # connected and checked once
            # Freeze the server so the request is accepted by its socket but not answered, send it,
            # then SIGKILL the server while the request is in flight and restart it on the same port.
            os.kill(srv.proc.pid, signal.SIGSTOP)
            task = asyncio.create_task(fetch(client))
            await asyncio.sleep(0.5)
            calls_before = client.requests
            srv.kill()
            restarted = await asyncio.to_thread(ServeProcess, run_dir, config_file, "--no-warmup", port=port, timeout=180)
            await task
            result.update(retries=client.retries, attempts=client.requests - calls_before + 1,
                          restart_s=restarted.start_s, server=restarted)

    try:
        asyncio.run(scenario())
    finally:
        srv.kill()
    srv2: ServeProcess = result["server"]
    try:
        np.testing.assert_allclose(result["samples"], ref, rtol=0, atol=1e-5)  # the retry gives the same samples
        assert result["retries"] >= 1

        async def failing(cfg: ClientConfig) -> tuple[float, str, int]:
            async with ServerClient(cfg) as c:
                t0 = time.monotonic()
                with pytest.raises(ServerRequestError) as e:
                    await c.handoff(n, labels, seed)
                return time.monotonic() - t0, str(e.value), c.requests

        quick = dict(token=TOKENS[0], retries=2, backoff_s=0.1, max_backoff_s=0.2)
        # stalled for good (SIGSTOP): each attempt ends at read_timeout_s, then a clear error
        async def stalled():
            async with ServerClient(ClientConfig(srv2.url, **quick)) as c:
                await c.info()
            os.kill(srv2.proc.pid, signal.SIGSTOP)
            return await failing(ClientConfig(srv2.url, read_timeout_s=1, connect_timeout_s=1, **quick))

        t_stall, msg_stall, att_stall = asyncio.run(stalled())
        srv2.kill()
        # gone for good: connection refused, retried, then a clear error
        t_gone, msg_gone, att_gone = asyncio.run(failing(ClientConfig(srv2.url, **quick)))
    finally:
        srv2.kill()
    assert att_stall == 3 and "no answer within read_timeout_s=1" in msg_stall and t_stall < 3 * 2 + 2
    assert att_gone == 3 and "could not reach the server" in msg_gone and "after 3 attempts" in msg_gone
    assert t_gone < 2
    assert TOKENS[0] not in msg_stall + msg_gone
    print(f"\nkilled mid-handoff: completed after {result['retries']} retries in {result['seconds']:.1f} s "
          f"(restart took {result['restart_s']:.1f} s); stalled server: failed after {att_stall} attempts in "
          f"{t_stall:.1f} s; gone server: failed after {att_gone} attempts in {t_gone:.2f} s")


def _spool_keys(run: str) -> set[str]:
    pending = os.path.join(run, "server_training", "spool", "pending")
    out = set()
    for f in os.listdir(pending) if os.path.isdir(pending) else ():
        if f.endswith(".json"):
            m = json.load(open(os.path.join(pending, f)))
            out.add(f"{m['client']}/{m['batch_id']}")
    return out


def _checkpoint_extra(run: str) -> dict:
    from collafuse.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(os.path.join(run, "server_training"))
    return read_state(ckpt)["extra"] if ckpt else {"trained": [], "trained_rows": 0}


def test_server_killed_mid_training_loses_no_acknowledged_batch(run_dir, tmp_path):
    """An uploader posts batches back to back (retrying each until 200 or 409); the server is
    SIGKILLed mid-stream and restarted. On disk after the kill, every acknowledged batch is either
    trained into the checkpoint or still spooled; at the end each was trained exactly once."""
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml().replace("[server]", "[server]\ntrain = true\ntrain_checkpoint_every = 2\n"
                                                    "train_batch_rows = 8"))
    rows, total, kill_after = 4, 30, 12
    srv = ServeProcess(run, str(cfg), "--no-warmup", port=free_port(), timeout=180)
    target = {"url": srv.url}
    acked: list[str] = []
    stats = {"errors": 0, "dup_after_retry": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def upload(i: int) -> None:
        bid = f"b{i:03d}"
        x = np.random.default_rng(i).standard_normal((rows, 1, 16, 16)).astype(np.float32)
        from collafuse_edge.protocol import encode_tensor

        body = encode_tensor(x)
        failed = False
        while not stop.is_set():
            req = urllib.request.Request(target["url"] + "/v1/train", data=body, method="POST", headers={
                **auth(i % 3), "Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": bid,
                "X-Collafuse-Level": str({0: 29, 1: 19, 2: 39}[i % 3]),
                "X-Collafuse-Labels": ",".join(str((i + j) % 10) for j in range(rows))})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
            except urllib.error.HTTPError as e:
                if e.code != 409:  # 409: stored before the crash, its answer lost: acknowledged now
                    raise
                stats["dup_after_retry"] += 1
                assert failed, f"{bid}: 409 for a batch never sent before"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                failed = True
                stats["errors"] += 1
                time.sleep(0.05)
                continue
            with lock:
                acked.append(f"{i % 3}/{bid}")
            return

    def uploader() -> None:
        for i in range(total):
            upload(i)

    th = threading.Thread(target=uploader)
    th.start()
    srv2 = None
    try:
        deadline = time.monotonic() + 120
        latest = os.path.join(run, "server_training", "LATEST")
        while (len(acked) < kill_after or not os.path.exists(latest)) and time.monotonic() < deadline:
            time.sleep(0.01)  # some batches trained into a checkpoint, some only spooled
        srv.kill()  # SIGKILL: no graceful checkpoint, uploads in flight
        with lock:
            acked_at_kill = set(acked)
        extra = _checkpoint_extra(run)
        trained_at_kill, spooled_at_kill = set(extra["trained"]), _spool_keys(run)
        on_disk = trained_at_kill | spooled_at_kill
        srv2 = ServeProcess(run, str(cfg), "--no-warmup", port=free_port(), timeout=180)
        target["url"] = srv2.url
        th.join(180)
        assert not th.is_alive()
        # wait until the trainer drained the queue, then stop gracefully (final checkpoint)
        for _ in range(600):
            req = urllib.request.Request(srv2.url + "/v1/info", headers=auth(0))
            t = json.load(urllib.request.urlopen(req, timeout=10))["training"]
            if t["pending_batches"] == 0 and t["trained_batches"] >= total:
                break
            time.sleep(0.1)
        rc, log = srv2.stop()
    finally:
        stop.set()
        srv.kill()
        if srv2 is not None:
            srv2.kill()
    assert rc == 0, log
    assert acked_at_kill <= on_disk, f"acknowledged but lost: {sorted(acked_at_kill - on_disk)}"
    assert len(on_disk - acked_at_kill) <= 1  # at most the upload in flight at the kill (stored, unanswered)
    final = _checkpoint_extra(run)
    assert len(acked) == total and set(final["trained"]) == set(acked)
    assert final["trained_rows"] == rows * total  # none trained twice (counted across the restart)
    assert _spool_keys(run) == set()
    print(f"\nkilled mid-training: {len(acked_at_kill)} acknowledged at the kill; on disk {len(trained_at_kill)} "
          f"trained + {len(spooled_at_kill)} spooled; {stats['errors']} failed attempts retried, "
          f"{stats['dup_after_retry']} answered 409 after the restart; finally {len(final['trained'])}/{total} "
          f"trained, {final['trained_rows']} rows = {rows}×{total}")


def test_second_trainer_on_a_run_is_refused_before_it_does_anything(run_dir, tmp_path):
    """Two ``serve --train`` on one run (different ports): the second exits non-zero naming the
    holder, before it loads a model or touches the run; the first keeps training and every batch
    it acknowledged is trained. A third on the first's port is refused for the port, also at once."""
    import subprocess
    import sys

    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml().replace("[server]", "[server]\ntrain = true\ntrain_checkpoint_every = 1\n"
                                                    "train_batch_rows = 4"))
    srv = ServeProcess(run, str(cfg), "--no-warmup", port=free_port(), timeout=180)
    try:
        before = sorted(os.listdir(run))
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "collafuse.cli", "serve", "--run", run, "--config", str(cfg),
                                 "--port", str(free_port()), "--no-warmup"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert "in use by pid" in second.stderr and "collafuse serve --train" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        same_port = subprocess.run([sys.executable, "-m", "collafuse.cli", "serve", "--run", run, "--config",
                                    str(cfg), "--port", str(srv.port), "--no-warmup"], capture_output=True,
                                   text=True, timeout=120)
        assert same_port.returncode == 2 and "already in use" in same_port.stderr, same_port.stderr
        assert "Traceback" not in same_port.stderr
        assert sorted(os.listdir(run)) == before
        refused_s = time.monotonic() - t0
        from collafuse_edge.protocol import encode_tensor

        acked = []
        for i in range(6):
            x = np.random.default_rng(i).standard_normal((4, 1, 16, 16)).astype(np.float32)
            req = urllib.request.Request(srv.url + "/v1/train", data=encode_tensor(x), method="POST", headers={
                **auth(0), "Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": f"b{i}",
                "X-Collafuse-Level": "29", "X-Collafuse-Labels": "0,1,2,3"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
            acked.append(f"0/b{i}")
        for _ in range(600):
            req = urllib.request.Request(srv.url + "/v1/info", headers=auth(0))
            if json.load(urllib.request.urlopen(req, timeout=10))["training"]["pending_batches"] == 0:
                break
            time.sleep(0.1)
        rc, log = srv.stop()
    finally:
        srv.kill()
    assert rc == 0, log
    assert set(_checkpoint_extra(run)["trained"]) == set(acked)
    print(f"\nsecond trainer and second bind refused in {refused_s:.1f} s; {len(acked)} batches trained by the first")
