"""Token handling and per-client isolation (docs/reliability.md): constant-time lookup, token
rotation without a restart (SIGHUP and the file watcher), tokens never in logs or error bodies,
a token cannot reach another client's level or upload as another client, size and rate limits."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import signal

import numpy as np
import pytest

from collafuse.server import auth as auth_mod
from collafuse.server.app import create_app
from collafuse.server.state import STATE
from collafuse.server.config import ServerConfig, hash_token, load_server_config
from collafuse_edge.protocol import encode_tensor
from server_fixtures import DISABLED_TOKEN, LIMITED_TOKEN, TOKENS, auth, token_entries

NPY = "application/x-npy"
LEVELS = {0: 29, 1: 19, 2: 39}


def _toml(tokens: dict[int, str], extra: str = "") -> str:
    lines = ["[server]", "max_n = 8", "max_batch_rows = 64", "warmup = false", extra, ""]
    for client, tok in tokens.items():
        lines += ["[[tokens]]", f'name = "client-{client}"', f"client = {client}", f'sha256 = "{hash_token(tok)}"', ""]
    return "\n".join(lines)


def _upload_headers(token: str, level: int, batch: str, rows: int = 4) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": NPY, "X-Collafuse-Batch-Id": batch,
            "X-Collafuse-Level": str(level), "X-Collafuse-Labels": ",".join(str(i % 10) for i in range(rows))}


def _x(rows: int = 4) -> bytes:
    return encode_tensor(np.random.default_rng(rows).standard_normal((rows, 1, 16, 16)).astype(np.float32))


def test_token_lookup_is_constant_time(monkeypatch, run_dir):
    """Digests are compared with hmac.compare_digest against every entry, hit or miss, first or last."""
    src = inspect.getsource(auth_mod.TokenStore.lookup)
    assert "compare_digest" in src and "break" not in src and "return g" not in src
    from collafuse.checkpoint import read_config

    cfg = ServerConfig(run_dir, tokens=token_entries())
    rc = read_config(run_dir)
    store = auth_mod.TokenStore.from_config(cfg, rc.cut_ratios, rc.schedule.num_train_timesteps)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for tok in (TOKENS[0], DISABLED_TOKEN, "nope", ""):
        calls.clear()
        store.lookup(tok)
        assert len(calls) == len(store) == 5
    assert store.lookup(TOKENS[2]).client == 2 and store.lookup("nope") is None


async def test_token_rotation_by_sighup_and_by_file_change(aiohttp_client, run_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="collafuse.server")
    path = tmp_path / "server.toml"
    old, new, newer = "rotate-old-token-0", "rotate-new-token-0", "rotate-newer-token-0"
    path.write_text(_toml({0: old, 1: TOKENS[1]}, "token_reload_s = 0.2"))
    cfg = load_server_config(run_dir, str(path))
    assert cfg.config_file == str(path) and cfg.token_reload_s == 0.2
    c = await aiohttp_client(create_app(cfg))

    async def status(tok):
        return (await c.get("/v1/info", headers={"Authorization": f"Bearer {tok}"})).status

    assert await status(old) == 200 and await status(new) == 401
    # 1) SIGHUP: re-read at once (the watcher is not what does it: its period has not passed)
    path.write_text(_toml({0: new, 1: TOKENS[1]}, "token_reload_s = 0.2"))
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.05)
    assert await status(old) == 401 and await status(new) == 200 and await status(TOKENS[1]) == 200
    # 2) a broken file changes nothing (the tokens in force stay; the error is logged)
    path.write_text(_toml({0: new, 1: TOKENS[1]}).replace("client = 1", "client = 99"))
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.05)
    assert await status(new) == 200 and await status(TOKENS[1]) == 200
    assert any("token reload" in r.getMessage() and "stay in force" in r.getMessage() for r in caplog.records)
    # 3) no signal: the watcher sees the file change within token_reload_s
    path.write_text(_toml({0: newer, 1: TOKENS[1]}, "token_reload_s = 0.2"))
    for _ in range(50):
        if await status(newer) == 200:
            break
        await asyncio.sleep(0.1)
    assert await status(newer) == 200 and await status(new) == 401
    text = caplog.text
    assert "reloaded 2 tokens" in text
    for tok in (old, new, newer, TOKENS[1]):
        assert tok not in text and hash_token(tok) not in text


async def test_an_unchanged_token_keeps_its_rate_limit_across_a_reload(aiohttp_client, run_dir, tmp_path):
    from collafuse.server.token_reload import reload_tokens

    path = tmp_path / "server.toml"
    body = _toml({1: TOKENS[1]}) + (f'[[tokens]]\nname = "limited"\nclient = 0\nsha256 = "{hash_token(LIMITED_TOKEN)}"\n'
                                   "requests_per_minute = 2\nburst = 2\n")
    path.write_text(body)
    c = await aiohttp_client(create_app(load_server_config(run_dir, str(path))))
    lim = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
    for _ in range(2):
        assert (await c.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=lim)).status == 200
    path.write_text(body + f'\n[[tokens]]\nclient = 2\nsha256 = "{hash_token(TOKENS[2])}"\n')  # add a token
    assert reload_tokens(c.server.app[STATE])
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=lim)
    assert r.status == 429  # the bucket was not refilled by the reload
    assert (await c.get("/v1/info", headers=auth(2))).status == 200


async def test_tokens_never_appear_in_logs_or_error_bodies(aiohttp_client, run_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "server.toml"
    path.write_text(_toml(TOKENS) + f'[[tokens]]\nname = "revoked"\nclient = 1\nsha256 = "{hash_token(DISABLED_TOKEN)}"\n'
                                    "disabled = true\n")
    import shutil

    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    cfg = load_server_config(own, str(path), train=True, max_train_body_bytes=8192)
    c = await aiohttp_client(create_app(cfg))
    wrong = "wrong-secret-token-XYZ-1234567890"
    secrets_ = [*TOKENS.values(), DISABLED_TOKEN, wrong]
    answers = []

    async def go(method, url, **kw):
        r = await c.request(method, url, **kw)
        answers.append((r.status, await r.read(), dict(r.headers)))

    for h in ({"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Basic {TOKENS[0]}"},
              {"Authorization": f"Bearer {DISABLED_TOKEN}"}, {"Authorization": f"{TOKENS[0]}"},
              {"Authorization": f"Bearer {TOKENS[0]} {TOKENS[1]}"}):
        await go("GET", "/v1/info", headers=h)
        await go("POST", "/v1/handoff", json={"n": 1}, headers=h)
    await go("POST", "/v1/handoff", json={"n": 999, "labels": [0], "client": 2, "token": TOKENS[2]}, headers=auth(0))
    await go("POST", "/v1/handoff", json={"n": 1, "labels": [0], "handoff_level": 19}, headers=auth(0))
    await go("POST", "/v1/handoff", data=b"x" * 70000, headers={**auth(0), "Content-Type": "application/json"})
    await go("POST", "/v1/train", data=_x(), headers=_upload_headers(TOKENS[0], 19, "b1"))
    await go("POST", "/v1/train", data=b"\x93NUMPY" + TOKENS[0].encode(), headers=_upload_headers(TOKENS[0], 29, "b2"))
    await go("POST", "/v1/train", data=b"0" * 9000, headers=_upload_headers(TOKENS[0], 29, "b3"))
    await go("GET", "/nope/x", headers=auth(1))
    await go("GET", "/metrics")
    os.kill(os.getpid(), signal.SIGHUP)  # a reload logs the token names
    await asyncio.sleep(0.05)
    await go("GET", "/metrics")
    assert {s for s, _, _ in answers} >= {401, 403, 400, 413}
    for status, body, headers in answers:
        blob = body.decode("latin-1") + repr(headers)
        for s in secrets_:
            assert s not in blob and hash_token(s) not in blob, (status, body)
    logs = caplog.text + "".join(repr(r.args) for r in caplog.records)
    for s in secrets_:
        assert s not in logs and hash_token(s) not in logs


async def test_a_token_cannot_act_for_another_client(aiohttp_client, run_dir, tmp_path):
    import shutil

    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    c = await aiohttp_client(create_app(ServerConfig(own, tokens=token_entries(), warmup=False, train=True,
                                                     train_checkpoint_every=1000)))
    # handoff: another client's level or id is refused; /v1/info only describes the caller
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0], "handoff_level": LEVELS[1]}, headers=auth(0))
    assert r.status == 403
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0], "client": 1}, headers=auth(0))
    assert r.status == 403
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=auth(2))
    assert r.status == 200 and r.headers["X-Collafuse-Level"] == str(LEVELS[2]) and r.headers["X-Collafuse-Client"] == "2"
    you = (await (await c.get("/v1/info", headers=auth(1))).json())["you"]
    assert you["client"] == 1 and you["handoff_level"] == LEVELS[1]
    # uploads: at another client's level → 403; batch ids are per client (no cross-client replay/clobber)
    r = await c.post("/v1/train", data=_x(), headers=_upload_headers(TOKENS[0], LEVELS[1], "step-1"))
    assert r.status == 403 and (await r.json())["error"]["code"] == "wrong_level"
    for client in (0, 1):
        r = await c.post("/v1/train", data=_x(), headers=_upload_headers(TOKENS[client], LEVELS[client], "step-1"))
        assert r.status == 200, await r.text()
    r = await c.post("/v1/train", data=_x(), headers=_upload_headers(TOKENS[0], LEVELS[0], "step-1"))
    assert r.status == 409
    spool = c.server.app[STATE].trainer.spool
    assert spool.seen(0, "step-1") and spool.seen(1, "step-1") and not spool.seen(2, "step-1")


async def test_size_and_rate_limits(aiohttp_client, run_dir, tmp_path):
    import shutil

    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    cfg = ServerConfig(own, tokens=token_entries(), warmup=False, train=True, max_body_bytes=1024,
                       max_train_body_bytes=8192, max_train_rows=4, train_checkpoint_every=1000)
    c = await aiohttp_client(create_app(cfg))
    # 413: handoff body over max_body_bytes (but under the upload limit), upload over its limit, too many rows
    r = await c.post("/v1/handoff", data=b" " * 2000, headers={**auth(0), "Content-Type": "application/json"})
    assert r.status == 413
    r = await c.post("/v1/train", data=_x(rows=12), headers=_upload_headers(TOKENS[0], 29, "big", rows=12))
    assert r.status == 413 and "8192" in (await r.json())["error"]["message"]
    r = await c.post("/v1/train", data=_x(rows=5), headers=_upload_headers(TOKENS[0], 29, "rows", rows=5))
    assert r.status == 413
    # over-long header line: refused by the HTTP parser, the server goes on
    r = await c.get("/v1/info", headers={**auth(0), "X-Junk": "j" * 20000})
    assert 400 <= r.status < 500
    # 429: the limited token (2 per minute, burst 2) — handoffs and uploads share the bucket
    lim = LIMITED_TOKEN
    r = await c.post("/v1/train", data=_x(), headers=_upload_headers(lim, 29, "l1"))
    assert r.status == 200, await r.text()
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers={"Authorization": f"Bearer {lim}"})
    assert r.status == 200
    r = await c.post("/v1/train", data=_x(), headers=_upload_headers(lim, 29, "l2"))
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert (await r.json())["error"]["code"] == "rate_limited"
    assert (await c.get("/v1/info", headers=auth(0))).status == 200
