"""Scale-out as docs/operations.md describes it: two ``collafuse serve`` replicas of one run behind
HAProxy (Debian's package) on loopback, TLS terminated at the proxy, round robin with ``/readyz``
health checks. A client's handoff is identical whichever replica answers (keyed noise), equal to
in-process split sampling, and both replicas name the same model version.

Skipped where haproxy is not installed (``apt-get install haproxy``)."""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from collafuse.serve_process import ServeProcess, free_port
from collafuse_edge.protocol import H_MODEL_VERSION, decode_tensor
from server_fixtures import TOKENS, labels_for, reference_handoff, token_toml

HAPROXY = shutil.which("haproxy")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")]

HAPROXY_CFG = """\
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend collafuse_tls
    bind 127.0.0.1:{port} ssl crt {pem}
    default_backend collafuse
backend collafuse
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Replica %[srv_name]
    server a 127.0.0.1:{port_a} check inter 1s
    server b 127.0.0.1:{port_b} check inter 1s
"""


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def test_two_replicas_behind_haproxy_with_tls_answer_identically(run_dir, loaded_run, cert, tmp_path):
    cfg = tmp_path / "server.toml"
    cfg.write_text(token_toml())
    cert_pem, key_pem = cert
    pem = tmp_path / "haproxy.pem"  # haproxy takes the chain and the key in one file
    pem.write_text(open(cert_pem).read() + open(key_pem).read())
    env = {"OMP_NUM_THREADS": "1"}
    replicas = [ServeProcess(run_dir, str(cfg), "--no-warmup", threads=1, env=env) for _ in range(2)]
    proxy = None
    try:
        for r in replicas:
            r.wait_ready()
        port = free_port()
        (tmp_path / "haproxy.cfg").write_text(HAPROXY_CFG.format(port=port, pem=pem, port_a=replicas[0].port,
                                                                 port_b=replicas[1].port))
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait_port(port)
        tls = ssl.create_default_context(cafile=cert_pem)
        body = {"n": 3, "labels": labels_for(3), "seed": 1234}
        answers = []
        for _ in range(4):
            req = urllib.request.Request(f"https://127.0.0.1:{port}/v1/handoff", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {TOKENS[0]}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, context=tls, timeout=120) as resp:
                answers.append((resp.headers["X-Replica"], resp.headers[H_MODEL_VERSION],
                                decode_tensor(resp.read())))
        by = {}
        for replica, version, x in answers:
            by.setdefault(replica, []).append((version, x))
        assert set(by) == {"a", "b"}, [a[0] for a in answers]  # round robin reached both replicas
        first = answers[0][2]
        for _, version, x in answers:
            assert version == answers[0][1]
            assert np.array_equal(x, first)  # bit for bit, whichever replica answered
        ref = reference_handoff(loaded_run, 0, 3, body["labels"], body["seed"])
        np.testing.assert_allclose(first, ref, rtol=0, atol=1e-5)
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=tls, timeout=30) as resp:
            assert resp.status == 200
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        codes = [r.close() for r in replicas]
    assert codes == [0, 0], [r.output_tail() for r in replicas]
