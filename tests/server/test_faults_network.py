"""Fault injection on a real TCP socket (in-process server on loopback, docs/reliability.md):
stalled headers, stalled bodies, a client that never reads its answers, TLS/plain-HTTP mismatch,
and a full disk under POST /v1/train. In each case the server frees what the bad peer held and
keeps answering everybody else."""
from __future__ import annotations

import asyncio
import errno
import shutil
import socket
import time

import numpy as np
import pytest
from aiohttp import web

from collafuse.server.app import create_app
from collafuse.server.config import ServerConfig
from collafuse_edge.errors import ServerRequestError
from collafuse_edge.http_client import ClientConfig, ServerClient
from collafuse_edge.protocol import encode_tensor
from server_fixtures import TOKENS, auth, token_entries

TIMEOUT = 0.5  # keepalive / body / send timeouts of the server under test (seconds)


async def _start(cfg: ServerConfig, loaded_run=None, ssl_context=None):
    from collafuse.server.serve import ssl_context as make_ssl

    app = create_app(cfg, run=loaded_run)
    runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=cfg.keepalive_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context or make_ssl(cfg))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 — the ephemeral port
    return runner, port


def _cfg(run_dir, **kw) -> ServerConfig:
    return ServerConfig(run_dir, tokens=token_entries(), warmup=False, keepalive_timeout_s=TIMEOUT,
                        body_timeout_s=TIMEOUT, send_timeout_s=TIMEOUT, **kw)


async def _ok(port: int, scheme: str = "http", **client_kw) -> None:
    """A well-behaved client gets a real answer (the server still serves others)."""
    async with ServerClient(ClientConfig(f"{scheme}://127.0.0.1:{port}", token=TOKENS[0], retries=0,
                                         **client_kw)) as c:
        h = await c.handoff(1, [3], seed=5)
    assert h.samples.shape == (1, 1, 16, 16)


async def _closed_within(reader: asyncio.StreamReader, limit: float, t0: float) -> tuple[float, bytes]:
    """Seconds from ``t0`` until the server closes the connection, and what it sent before."""
    data = b""
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), limit)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return time.monotonic() - t0, data


async def test_stalled_headers_and_stalled_body_are_cut_off(run_dir, loaded_run):
    runner, port = await _start(_cfg(run_dir), loaded_run)
    try:
        # 1) slowloris: half a request line and headers, then nothing
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(b"POST /v1/handoff HTTP/1.1\r\nHost: x\r\n")
        await w1.drain()
        t1 = time.monotonic()
        # 2) headers complete (valid token), the body announced but stalled after 10 of 100 bytes
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"POST /v1/handoff HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\nAuthorization: Bearer " + TOKENS[0].encode() + b"\r\n\r\n" + b'{"n": 1,  ')
        await w2.drain()
        t2 = time.monotonic()
        await _ok(port)  # others are served meanwhile
        assert len(runner.server.connections) >= 2
        t_head, sent_head = await _closed_within(r1, 10, t1)
        t_body, sent_body = await _closed_within(r2, 10, t2)
        await _ok(port)
        # every connection is gone (keep-alive ones of _ok included, after keepalive_timeout_s)
        deadline = time.monotonic() + 5
        while runner.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not runner.server.connections
    finally:
        w1.close()
        w2.close()
        await runner.cleanup()
    assert TIMEOUT * 0.9 < t_head < TIMEOUT + 2.5 and sent_head == b""  # closed by keepalive_timeout_s, nothing to say
    assert TIMEOUT * 0.9 < t_body < TIMEOUT + 2.5
    head, _, body = sent_body.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in body
    assert b"connection: close" in head.lower()
    print(f"\nstalled headers closed after {t_head:.2f} s, stalled body answered 408 and closed after {t_body:.2f} s")


@pytest.mark.parametrize("send_timeout", [TIMEOUT, 30.0])
async def test_a_client_that_never_reads_is_aborted(run_dir, loaded_run, send_timeout):
    """Hundreds of pipelined requests on a socket whose reader never reads: once the kernel buffers
    are full the server's write blocks; after send_timeout_s the connection is aborted. (With a
    30 s send timeout the connection is still held after 3 s: the test does exercise the timeout.)"""
    import dataclasses

    runner, port = await _start(dataclasses.replace(_cfg(run_dir), send_timeout_s=send_timeout), loaded_run)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        req = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
        n_req = 1500  # ~15 MB of answers: far beyond any socket buffer
        t0 = time.monotonic()
        sent = 0
        payload = req * n_req
        while sent < len(payload) and time.monotonic() - t0 < 5:  # the server may stop reading: that is fine
            try:
                sent += sock.send(payload[sent:])
            except BlockingIOError:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert len(runner.server.connections) == 1
        await _ok(port)  # the stuck connection does not stop anyone else
        deadline = time.monotonic() + (10 if send_timeout < 5 else 3)
        while runner.server.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        freed_after = time.monotonic() - t0
        if send_timeout < 5:
            assert not runner.server.connections, "the connection of a client that never reads was not freed"
            print(f"\nnever-reading client: connection aborted {freed_after:.2f} s after its first request "
                  f"(send_timeout_s={send_timeout})")
        else:
            assert len(runner.server.connections) == 1  # without a short send timeout it would hang on
        await _ok(port)
    finally:
        sock.close()
        await runner.cleanup()


async def test_tls_and_plain_http_mismatch_fail_clearly(run_dir, loaded_run, cert):
    tls_runner, tls_port = await _start(_cfg(run_dir, tls_cert=cert[0], tls_key=cert[1]), loaded_run)
    plain_runner, plain_port = await _start(_cfg(run_dir), loaded_run)
    try:
        # plain HTTP client → TLS server
        async with ServerClient(ClientConfig(f"http://127.0.0.1:{tls_port}", token=TOKENS[0], retries=1,
                                             backoff_s=0.05)) as c:
            t0 = time.monotonic()
            with pytest.raises(ServerRequestError, match="use an https:// URL") as e1:
                await c.info()
            t1 = time.monotonic() - t0
        # TLS client → plain HTTP server: not retried (a wrong scheme never heals)
        async with ServerClient(ClientConfig(f"https://127.0.0.1:{plain_port}", token=TOKENS[0], retries=3,
                                             backoff_s=0.05, ca_file=cert[0])) as c:
            t0 = time.monotonic()
            with pytest.raises(ServerRequestError, match="answered in plain HTTP, not TLS: use an http:// URL") as e2:
                await c.info()
            t2 = time.monotonic() - t0
            assert c.requests == 1
        # both servers keep serving
        await _ok(tls_port, "https", ca_file=cert[0])
        await _ok(plain_port)
    finally:
        await tls_runner.cleanup()
        await plain_runner.cleanup()
    assert TOKENS[0] not in str(e1.value) + str(e2.value)
    assert t1 < 5 and t2 < 5
    print(f"\nplain→TLS: {t1:.2f} s: {e1.value}\nTLS→plain: {t2:.2f} s: {e2.value}")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
async def test_full_or_read_only_disk_under_uploads_is_a_503_and_nothing_is_acknowledged(
        aiohttp_client, run_dir, tmp_path, monkeypatch, err):
    import os

    from collafuse import spool as spool_mod

    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    c = await aiohttp_client(create_app(ServerConfig(own, tokens=token_entries(), warmup=False, train=True,
                                                     train_checkpoint_every=1)))
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    hdr = {**auth(0), "Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": "b1", "X-Collafuse-Level": "29",
           "X-Collafuse-Labels": "0,1,2,3"}
    real = spool_mod.atomic_write_bytes

    def refuse(path, data):
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(spool_mod, "atomic_write_bytes", refuse)
    r = await c.post("/v1/train", data=encode_tensor(x), headers=hdr)
    assert r.status == 503, await r.text()
    doc = await r.json()
    assert doc["error"]["code"] == "storage_unavailable" and r.headers["Retry-After"]
    assert os.strerror(err) in doc["error"]["message"]
    pending = os.path.join(own, "server_training", "spool", "pending")
    assert os.listdir(pending) == []  # nothing half-written, nothing acknowledged
    monkeypatch.setattr(spool_mod, "atomic_write_bytes", real)
    r = await c.post("/v1/train", data=encode_tensor(x), headers=hdr)  # the client's retry, same batch id
    assert r.status == 200, await r.text()  # not a 409: the refused attempt reserved nothing


@pytest.mark.parametrize("path", ["/v1/handoff", "/v1/train"])
async def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(run_dir, loaded_run, caplog, path):
    """Found by benchmarks/load_test.py: a body cut short by a closed connection used to surface as
    ConnectionResetError → 500 with an ERROR traceback per request (a log flood on demand)."""
    import logging
    import re

    caplog.set_level(logging.DEBUG, logger="collafuse.server")
    runner, port = await _start(_cfg(run_dir), loaded_run)
    try:
        for _ in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            ctype = b"application/json" if path == "/v1/handoff" else b"application/x-npy"
            w.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype +
                    b"\r\nContent-Length: 1000\r\nAuthorization: Bearer " + TOKENS[0].encode() + b"\r\n\r\n" + b"{" * 10)
            await w.drain()
            w.close()  # hang up with 990 bytes still owed
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await _ok(port)  # still serving
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
        if path == "/v1/handoff":  # (this server does not train: /v1/train refuses before reading)
            assert 'status="499"' in text  # counted, as nginx does, as "client closed request"
        assert not re.search(r'status="5\d\d"', text), "a hang-up was counted as a server error"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    finally:
        await runner.cleanup()


async def test_malformed_http_is_a_400_without_an_error_log(run_dir, loaded_run, caplog):
    """aiohttp's parser refuses these before our middleware; it used to log an ERROR traceback for
    each (a log flood on demand, found by the HTTP fuzzer)."""
    import logging

    caplog.set_level(logging.INFO)
    runner, port = await _start(_cfg(run_dir), loaded_run)
    try:
        for raw in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
                    b"GET /healthz HTTP/9.9x\r\nHost: x\r\n\r\n",
                    b"POST /v1/handoff HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(raw)
            await w.drain()
            head = await asyncio.wait_for(r.read(12), 5)
            assert head.startswith(b"HTTP/1.") and b" 400" in head, head
            w.close()
        await _ok(port)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]
    finally:
        await runner.cleanup()
