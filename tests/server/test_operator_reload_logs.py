"""Token reloads tell the operator what happened: a changed ``[server]`` table is a WARNING that it
needs a restart, a failed reload an ERROR, the next good reload an INFO line (even when the tokens
did not change), and ``collafuse_token_reloads_total{result}`` counts them."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from collafuse.server.app import create_app
from collafuse.server.cli import LOG_FORMAT
from collafuse.server.config import load_server_config
from collafuse.server.state import STATE
from server_fixtures import TOKENS, auth, token_toml


async def _hup():
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)


async def test_reload_logging_and_counts(aiohttp_client, run_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="collafuse.server")
    path = tmp_path / "server.toml"
    good = token_toml() + "\n"  # [server] max_n = 8, max_batch_rows = 64; three client tokens
    path.write_text(good.replace("[server]\n", "[server]\ntoken_reload_s = 0\n"))
    c = await aiohttp_client(create_app(load_server_config(run_dir, str(path))))
    state = c.server.app[STATE]
    get = state.metrics.registry.get_sample_value

    def records(level):
        return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "collafuse.server"]

    # 1) a [server] edit: tokens reloaded (unchanged), the edit needs a restart
    caplog.clear()
    path.write_text(good.replace("max_n = 8", "max_n = 4").replace("[server]\n", "[server]\ntoken_reload_s = 0\n"))
    await _hup()
    warnings = records(logging.WARNING)
    assert len(warnings) == 1 and "[server] changed" in warnings[0] and "max_n" in warnings[0]
    assert "need a restart" in warnings[0] and "max_batch_rows" not in warnings[0]
    assert state.config.max_n == 8  # not applied
    assert any("token reload" in m and "ok" in m for m in records(logging.INFO))
    assert get("collafuse_token_reloads_total", {"result": "ok"}) == 1

    # 2) a broken file: ERROR, the tokens in force stay
    caplog.clear()
    path.write_text(good.replace("client = 1", "client = 99"))
    await _hup()
    assert any("failed" in m and "stay in force" in m for m in records(logging.ERROR))
    assert get("collafuse_token_reloads_total", {"result": "failed"}) == 1
    assert (await c.get("/v1/info", headers=auth(1))).status == 200

    # 3) fixed, with the same tokens as before: an INFO line ends the story, not the ERROR
    caplog.clear()
    path.write_text(good.replace("[server]\n", "[server]\ntoken_reload_s = 0\n"))
    await _hup()
    info = records(logging.INFO)
    assert len(info) == 1 and "unchanged" in info[0] and "earlier failure is resolved" in info[0], info
    assert not records(logging.WARNING) and not records(logging.ERROR)  # [server] is as at start again
    assert get("collafuse_token_reloads_total", {"result": "ok"}) == 2
    for tok in TOKENS.values():
        assert tok not in caplog.text


def test_log_lines_carry_the_process_id():
    record = logging.LogRecord("collafuse.server", logging.INFO, __file__, 1, "serving", None, None)
    line = logging.Formatter(LOG_FORMAT).format(record)
    assert f"collafuse.server[{os.getpid()}]: serving" in line
