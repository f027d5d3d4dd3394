"""HTTPS with --tls-cert/--tls-key (verified by the edge client's ca_file), the serve CLI, config files."""
from __future__ import annotations

import json

import pytest

from collafuse.server.config import ServerConfig, hash_token, load_server_config
from collafuse.server.errors import ServerConfigError
from server_fixtures import TOKENS, token_entries, token_toml


async def test_https_with_a_self_signed_certificate(run_dir, loaded_run, cert):
    from aiohttp import web

    from collafuse.server.app import create_app
    from collafuse.server.serve import ssl_context
    from collafuse_edge.errors import ServerRequestError
    from collafuse_edge.http_client import ClientConfig, ServerClient

    cfg = ServerConfig(run_dir, tokens=token_entries(), tls_cert=cert[0], tls_key=cert[1], warmup=False)
    runner = web.AppRunner(create_app(cfg, run=loaded_run))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context(cfg))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 — the ephemeral port
    try:
        url = f"https://127.0.0.1:{port}"
        async with ServerClient(ClientConfig(url, token=TOKENS[1], ca_file=cert[0])) as c:
            h = await c.handoff(2, [1, 2], seed=4)
        assert h.samples.shape == (2, 1, 16, 16) and h.level == 19
        async with ServerClient(ClientConfig(url, token=TOKENS[1], retries=0)) as c:  # not trusted
            with pytest.raises(ServerRequestError, match="could not reach"):
                await c.info()
    finally:
        await runner.cleanup()


def test_config_file_toml_and_json(tmp_path, run_dir):
    p = tmp_path / "s.toml"
    p.write_text(token_toml())
    cfg = load_server_config(run_dir, str(p), port=9999, max_n=None)
    assert cfg.max_n == 8 and cfg.max_batch_rows == 64 and cfg.port == 9999 and len(cfg.tokens) == 3
    j = tmp_path / "s.json"
    j.write_text(json.dumps({"server": {"batching": False},
                             "tokens": [{"client": 1, "sha256": hash_token("x"), "max_n": 4}]}))
    cfg = load_server_config(run_dir, str(j))
    assert cfg.batching is False and cfg.tokens[0].max_n == 4 and cfg.tokens[0].name == "client-1"


@pytest.mark.parametrize("doc,match", [
    ({"tokens": [{"client": 0, "token": "plain"}]}, "store its sha256 digest"),
    ({"tokens": [{"client": 0, "sha256": "abc"}]}, "64-character"),
    ({"server": {"max_n": 0}}, "max_n must be a positive integer"),
    ({"server": {"max_n": 300}}, "must not exceed max_batch_rows"),
    ({"server": {"bogus": 1}}, "unknown keys"),
    ({"extra": {}}, "unknown top-level keys"),
    ({"tokens": [{"client": 0, "sha256": "a" * 64, "max_n": 100}]}, "exceeds the server's max_n"),
    ({"tokens": [{"client": 0, "sha256": "a" * 64}, {"client": 1, "sha256": "a" * 64}]}, "same digest"),
    ({"server": {"tls_cert": "/nonexistent.pem"}}, "tls_cert and tls_key go together"),
])
def test_bad_config_files_name_the_problem(tmp_path, run_dir, doc, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ServerConfigError, match=match):
        load_server_config(run_dir, str(p))


def test_serve_cli_new_token_and_errors(capsys, tmp_path, run_dir):
    from collafuse.cli import main

    assert main(["serve", "--new-token", "2"]) == 0
    out = capsys.readouterr().out
    token = out.split("\n")[1].strip()
    assert f'sha256 = "{hash_token(token)}"' in out and "client = 2" in out
    assert main(["serve"]) == 2
    assert "--run DIR is required" in capsys.readouterr().err
    assert main(["serve", "--run", run_dir]) == 2  # no tokens: refuses to start
    assert "no client tokens" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("tokens: []")
    assert main(["serve", "--run", run_dir, "--config", str(tmp_path / "x.yaml")]) == 2
    assert "must end in .json or .toml" in capsys.readouterr().err
    assert main(["serve", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
