"""A token's ``min_handoff_level``: uploads of x_h below it are answered 403
``handoff_below_minimum`` and never spooled; at or above it they are accepted; ``/v1/info`` shows
it; a token reload carries it; bad values are one-line config errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from collafuse.server.app import create_app
from collafuse.server.auth import make_grant
from collafuse.server.config import ServerConfig, TokenEntry, hash_token, load_server_config, load_tokens
from collafuse.server.errors import ServerConfigError
from collafuse.server.state import STATE
from collafuse.server.token_reload import reload_tokens
from collafuse_edge.protocol import encode_tensor
from server_fixtures import CUT_RATIOS, T, TOKENS, auth

LEVELS = {0: 29, 1: 19, 2: 39}  # the fixture run's handoff levels per client


def _toml(mins: dict[int, int]) -> str:
    lines = ["[server]", "train = true", "token_reload_s = 0", "max_train_rows = 16", ""]
    for i, tok in TOKENS.items():
        lines += ["[[tokens]]", f'name = "client-{i}"', f"client = {i}", f'sha256 = "{hash_token(tok)}"']
        if i in mins:
            lines.append(f"min_handoff_level = {mins[i]}")
        lines.append("")
    return "\n".join(lines)


def _upload(client: int, batch: str):
    x = np.random.default_rng(client).standard_normal((4, 1, 16, 16)).astype(np.float32)
    h = {**auth(client), "Content-Type": "application/x-npy", "X-Collafuse-Batch-Id": batch,
         "X-Collafuse-Level": str(LEVELS[client]), "X-Collafuse-Labels": "0,1,2,3"}
    return encode_tensor(x), h


@pytest.fixture
async def served(aiohttp_client, run_dir, tmp_path):
    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    path = tmp_path / "server.toml"
    path.write_text(_toml({0: 30, 2: 39}))  # client 0 uploads at 29 < 30; client 2 at exactly 39
    c = await aiohttp_client(create_app(load_server_config(own, str(path))))
    return c, path


async def test_below_minimum_is_refused_and_not_spooled(served):
    c, path = served
    state = c.server.app[STATE]
    body, h = _upload(0, "b1")
    r = await c.post("/v1/train", data=body, headers=h)
    assert r.status == 403
    err = (await r.json())["error"]
    assert err["code"] == "handoff_below_minimum" and "30" in err["message"] and "29" in err["message"]
    assert len(state.trainer.spool) == 0
    info = await (await c.get("/v1/info", headers=auth(0))).json()
    assert info["you"]["min_handoff_level"] == 30 and info["you"]["handoff_level"] == 29
    assert info["training"]["pending_batches"] == 0 and info["training"]["trained_batches"] == 0
    # inference is not affected by the minimum
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0], "seed": 1}, headers=auth(0))
    assert r.status == 200

    # at the minimum, and without one: accepted
    for client in (2, 1):
        body, h = _upload(client, "b1")
        r = await c.post("/v1/train", data=body, headers=h)
        assert r.status == 200, await r.text()
    info1 = await (await c.get("/v1/info", headers=auth(1))).json()
    assert info1["you"]["min_handoff_level"] is None

    # a token reload carries the field both ways: client 0 loses its minimum, client 1 gains one
    path.write_text(_toml({1: 20, 2: 39}))
    assert reload_tokens(state)
    body, h = _upload(0, "b2")
    assert (await c.post("/v1/train", data=body, headers=h)).status == 200
    body, h = _upload(1, "b2")
    r = await c.post("/v1/train", data=body, headers=h)
    assert r.status == 403 and (await r.json())["error"]["code"] == "handoff_below_minimum"
    info1 = await (await c.get("/v1/info", headers=auth(1))).json()
    assert info1["you"]["min_handoff_level"] == 20


@pytest.mark.parametrize("value", [-1, 1.5, "400", True])
def test_bad_minimum_is_a_one_line_config_error(tmp_path, value):
    with pytest.raises(ServerConfigError) as e:
        TokenEntry(hash_token("t"), client=0, name="site", min_handoff_level=value)
    msg = str(e.value)
    assert "\n" not in msg and "min_handoff_level" in msg and "site" in msg
    # the same from a config file (and so from a token reload)
    path = tmp_path / "server.toml"
    path.write_text(_toml({0: 30}).replace("min_handoff_level = 30", f"min_handoff_level = {value!r}"
                                            .replace("'", '"').replace("True", "true")))
    with pytest.raises(ServerConfigError) as e:
        load_tokens(str(path))
    assert "\n" not in str(e.value) and "min_handoff_level" in str(e.value)


def test_minimum_beyond_the_schedule_is_refused(run_dir):
    entry = TokenEntry(hash_token("t"), client=0, name="site", min_handoff_level=T)
    with pytest.raises(ServerConfigError) as e:
        make_grant(entry, ServerConfig(run_dir), CUT_RATIOS, T)
    assert "\n" not in str(e.value) and f"[0, {T - 1}]" in str(e.value)
    top = TokenEntry(hash_token("t"), client=0, min_handoff_level=T - 1)
    ok = make_grant(top, ServerConfig(run_dir), CUT_RATIOS, T)
    assert ok.min_handoff_level == T - 1
