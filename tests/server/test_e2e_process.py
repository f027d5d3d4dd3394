"""End to end on loopback: a real ``collafuse serve`` process, an exported bundle, the torch-free
edge client over HTTP — equal to in-process split sampling with the same seed (docs/architecture.md).
Also: several worker processes (gunicorn's aiohttp worker) and graceful SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from collafuse_edge import EdgeRuntime
from collafuse_edge.http_client import ClientConfig, ServerClient, generate_over_http
from server_fixtures import TOKENS, ServeProcess, labels_for, token_toml


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("cfg") / "server.toml"
    p.write_text(token_toml())
    return str(p)


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> str:
    """Client 0's exported bundle (the real exporter: ONNX validated against torch)."""
    from collafuse.export.cli import export_client
    from collafuse.export.exporter import ExportConfig

    out = str(tmp_path_factory.mktemp("bundle") / "client0")
    export_client(run_dir, 0, out, ExportConfig(measure_speed=False))
    return out


def test_edge_client_over_http_equals_in_process_split_sampling(run_dir, loaded_run, config_file, bundle):
    from collafuse.sampling import split_sample

    server = ServeProcess(run_dir, config_file)
    try:
        n, seed, labels = 3, 21, labels_for(3, 2)

        async def go():
            async with ServerClient(ClientConfig(server.url, token=TOKENS[0])) as client:
                info = await client.info()
                images = await generate_over_http(EdgeRuntime.open(bundle), client, n, labels, seed=seed)
                return info, images

        info, images = asyncio.run(go())
        k = loaded_run.config.client_levels[0]
        ref = split_sample(loaded_run.server, loaded_run.clients[0], loaded_run.schedule, k, n, shape=(1, 16, 16),
                           labels=labels, server_labels=labels, seed=seed)
        assert info.handoff_level == k - 1 == 29
        np.testing.assert_allclose(images, ref.images.numpy(), rtol=0, atol=1e-4)

        # the edge CLI drives the same client: collafuse-edge generate --server URL
        from collafuse_edge.cli import main as edge_main

        out = os.path.join(os.path.dirname(bundle), "cli.npy")
        os.environ["COLLAFUSE_TOKEN"] = TOKENS[0]
        try:
            rc = edge_main(["generate", "--bundle", bundle, "--server", server.url, "-n", "3", "--seed", str(seed),
                            "--labels", ",".join(map(str, labels)), "--out", out, "--sampler", "ddpm"])
        finally:
            del os.environ["COLLAFUSE_TOKEN"]
        assert rc == 0
        np.testing.assert_allclose(np.load(out), ref.images.numpy(), rtol=0, atol=1e-4)
    finally:
        rc, log = server.stop()
    assert rc == 0, log  # SIGTERM: drained and exited cleanly
    assert TOKENS[0] not in log


def _post(url: str, client: int, body: dict) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url + "/v1/handoff", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {TOKENS[client]}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read(), dict(r.headers)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_two_worker_processes_serve_the_same_results(run_dir, loaded_run, config_file):
    """``collafuse serve --workers 2``: gunicorn forks two aiohttp workers on one port; each runs its
    own engine; results are identical whichever worker answers."""
    pytest.importorskip("gunicorn")
    from concurrent.futures import ThreadPoolExecutor

    from collafuse_edge.protocol import decode_tensor
    from server_fixtures import reference_handoff

    server = ServeProcess(run_dir, config_file, "--workers", "2")
    try:
        deadline = time.monotonic() + 60
        while len(_children(server.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_children(server.proc.pid)) == 2
        # a gunicorn worker accepts connections only once its app started (model loaded)
        reqs = [(c, {"n": 2, "labels": labels_for(2, c), "seed": 100 + i}) for i, c in enumerate([0, 1, 2] * 3)]
        with ThreadPoolExecutor(len(reqs)) as pool:
            answers = list(pool.map(lambda r: _post(server.url, *r), reqs))
        for (c, body), (status, data, headers) in zip(reqs, answers):
            assert status == 200
            ref = reference_handoff(loaded_run, c, 2, body["labels"], body["seed"])
            np.testing.assert_allclose(decode_tensor(data), ref, rtol=0, atol=1e-5)
    finally:
        rc, log = server.stop()
    assert rc == 0, log
