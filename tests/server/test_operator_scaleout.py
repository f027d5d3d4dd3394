"""Scale-out as server/README.md describes it, with its HAProxy configuration as written there
(addresses moved to loopback): two inference replicas and one trainer of one run behind HAProxy
(Debian's package), TLS terminated at the proxy, uploads routed to the trainer, handoffs round robin
with ``/readyz`` health checks. A client's handoff is identical whichever replica answers (keyed
noise) and equal to in-process split sampling; after the trainer checkpoints an upload, both
replicas serve its new weights and again answer identically.

Skipped where haproxy is not installed (``apt-get install haproxy``)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from collafuse.serve_process import ServeProcess, free_port
from collafuse_edge.protocol import H_MODEL_VERSION, decode_tensor, encode_tensor
from server_fixtures import TOKENS, labels_for, reference_handoff, token_toml

HAPROXY = shutil.which("haproxy")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")]

README = os.path.join(os.path.dirname(__file__), "..", "..", "server", "README.md")


def _haproxy_cfg(port: int, pem: str, trainer: int, a: int, b: int) -> str:
    """server/README.md's configuration, on loopback ports."""
    with open(README, encoding="utf-8") as f:
        cfg = re.search(r"```haproxy\n(.*?)```", f.read(), re.S).group(1)
    for old, new in (("bind *:443 ssl crt /etc/haproxy/collafuse.pem", f"bind 127.0.0.1:{port} ssl crt {pem}"),
                     ("10.0.0.10:8080", f"127.0.0.1:{trainer}"), ("10.0.0.11:8080", f"127.0.0.1:{a}"),
                     ("10.0.0.12:8080", f"127.0.0.1:{b}")):
        assert old in cfg, old
        cfg = cfg.replace(old, new)
    return cfg


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def _call(port: int, tls, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body,
                                 headers={"Authorization": f"Bearer {TOKENS[0]}", **(headers or {})})
    with urllib.request.urlopen(req, context=tls, timeout=120) as resp:
        return resp.headers, resp.read()


def _handoffs(port: int, tls, body: dict, times: int = 4) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for _ in range(times):
        h, data = _call(port, tls, "/v1/handoff", json.dumps(body).encode(), {"Content-Type": "application/json"})
        out.append((h["X-Replica"], h[H_MODEL_VERSION], decode_tensor(data)))
    assert {r for r, _, _ in out} == {"a", "b"}, [r for r, _, _ in out]  # round robin reached both replicas
    for _, version, x in out:
        assert version == out[0][1] and np.array_equal(x, out[0][2])  # bit for bit, whichever replica
    return out


def test_replicas_and_a_trainer_behind_haproxy_with_tls(run_dir, loaded_run, cert, tmp_path):
    own = str(tmp_path / "run")  # the trainer writes into the run: a copy of the shared fixture
    shutil.copytree(run_dir, own)
    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml())
    trainer_cfg = tmp_path / "trainer.toml"
    trainer_cfg.write_text(token_toml().replace("[server]\n", "[server]\ntrain_checkpoint_every = 1\n"))
    cert_pem, key_pem = cert
    pem = tmp_path / "collafuse.pem"  # haproxy takes the chain and the key in one file
    pem.write_text(open(cert_pem).read() + open(key_pem).read())
    env = {"OMP_NUM_THREADS": "1"}
    procs = [ServeProcess(own, str(trainer_cfg), "--train", "--no-warmup", threads=1, env=env)]
    procs += [ServeProcess(own, str(cfg), "--no-warmup", "--weights-poll", "0.5", threads=1, env=env)
              for _ in range(2)]
    proxy = None
    try:
        for p in procs:
            p.wait_ready()
        port = free_port()
        (tmp_path / "haproxy.cfg").write_text(_haproxy_cfg(port, str(pem), *(p.port for p in procs)))
        subprocess.run([HAPROXY, "-c", "-q", "-f", str(tmp_path / "haproxy.cfg")], check=True)
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port)
        tls = ssl.create_default_context(cafile=cert_pem)
        body = {"n": 3, "labels": labels_for(3), "seed": 1234}
        before = _handoffs(port, tls, body)
        ref = reference_handoff(loaded_run, 0, 3, body["labels"], body["seed"])
        np.testing.assert_allclose(before[0][2], ref, rtol=0, atol=1e-5)

        # an upload goes to the trainer; its checkpoint reaches both replicas
        x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
        h, answer = _call(port, tls, "/v1/train", encode_tensor(x),
                          {"Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": "scaleout-1",
                           "X-Collafuse-Level": "29", "X-Collafuse-Labels": "0,1,2,3"})
        assert h["X-Replica"] == "trainer" and json.loads(answer)["accepted"] is True
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            h, data = _call(port, tls, "/v1/info")
            seen[h["X-Replica"]] = json.loads(data)["model_version"]
            if len(seen) == 2 and before[0][1] not in seen.values():
                break
            time.sleep(0.25)
        assert len(seen) == 2 and before[0][1] not in seen.values(), seen
        after = _handoffs(port, tls, body)
        assert after[0][1] != before[0][1] and not np.array_equal(after[0][2], before[0][2])
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        codes = [p.close() for p in procs]
    assert codes == [0, 0, 0], [p.output_tail() for p in procs]
