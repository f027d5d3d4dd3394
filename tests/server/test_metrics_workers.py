"""``collafuse serve --workers 2`` is one scrape target: a real server process with two gunicorn
workers, known traffic, exact totals from one scrape (whichever worker answers it), totals that
survive a worker's restart, and a metrics folder that serve creates and removes."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from collafuse.serve_process import ServeProcess
from server_fixtures import TOKENS, labels_for, token_toml

pytest.importorskip("gunicorn")

_ACCESS = re.compile(r"aiohttp\.access\[(\d+)\]: .*\"POST /v1/handoff")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _request(url: str, body: bytes | None = None, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    assert "_created" not in text  # disable_created_metrics: no _created series
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _metrics_dir(worker_pid: int) -> str:
    found = glob.glob(os.path.join(tempfile.gettempdir(), "collafuse-metrics-*", f"counter_{worker_pid}.db"))
    assert len(found) == 1, found
    return os.path.dirname(found[0])


def test_two_workers_scrape_as_one_target_with_exact_totals(run_dir, tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml())
    server = ServeProcess(run_dir, str(cfg), "--workers", "2", "--no-warmup", threads=1, log_level="info",
                          env={"OMP_NUM_THREADS": "1"})
    mdir = None
    try:
        server.wait_ready()
        deadline = time.monotonic() + 90
        while len(_children(server.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _children(server.pid)
        assert len(workers) == 2, server.output_tail()
        # known traffic until both workers have answered handoffs (their access lines carry the pid;
        # a gunicorn worker accepts connections only once its model is loaded)
        # (concurrent requests: while one worker computes, the other accepts the next connection)
        sent = body_bytes = 0
        answered_by: set[int] = set()
        with ThreadPoolExecutor(4) as pool:
            while len(answered_by) < 2 and sent < 64:
                bodies = [json.dumps({"n": 1, "labels": labels_for(1, i), "seed": i}).encode()
                          for i in range(sent, sent + 4)]
                codes = list(pool.map(lambda b: _request(server.url + "/v1/handoff", b, TOKENS[0]), bodies))
                assert codes == [200] * 4
                sent, body_bytes = sent + 4, body_bytes + sum(map(len, bodies))
                answered_by = {int(p) for p in _ACCESS.findall(server.output())}
        assert answered_by == set(workers), server.output_tail()
        for _ in range(3):
            assert _request(server.url + "/nope") == 404
        totals = []
        for _ in range(4):  # every scrape, whichever worker answers it, sees every worker's counts
            m = _scrape(server.url)
            totals.append((m['collafuse_requests_total{method="POST",route="/v1/handoff",status="200"}'],
                           m['collafuse_handoff_images_total{client="client-0"}'],
                           m['collafuse_requests_total{method="GET",route="unmatched",status="404"}'],
                           m['collafuse_http_bytes_total{direction="in"}'],
                           m["collafuse_handoff_seconds_count"]))
            assert m["collafuse_queue_waiting"] == 0 and m["collafuse_queue_active"] == 0
            assert [v for k, v in m.items() if k.startswith("collafuse_model_info{")] == [1.0]
        assert set(totals) == {(sent, sent, 3, body_bytes, sent)}, totals

        # a worker that exits: its counts stay in the totals, its live gauges are marked dead
        mdir = _metrics_dir(workers[0])
        os.kill(workers[0], signal.SIGTERM)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = _children(server.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            time.sleep(0.2)
        assert not os.path.exists(os.path.join(mdir, f"gauge_livesum_{workers[0]}.db"))
        assert os.path.exists(os.path.join(mdir, f"counter_{workers[0]}.db"))
        m = _scrape(server.url)
        assert m['collafuse_requests_total{method="POST",route="/v1/handoff",status="200"}'] == sent
        assert m['collafuse_handoff_images_total{client="client-0"}'] == sent
    finally:
        rc = server.close()
    assert rc == 0, server.output_tail()
    assert mdir is not None and not os.path.exists(mdir)  # serve removed its metrics folder
    assert "Traceback" not in server.output(), server.output_tail()
