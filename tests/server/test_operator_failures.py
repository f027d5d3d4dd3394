"""What an operator gets wrong fails as one line on stderr and exit code 2, before the model loads:
the port already in use (one process and --workers 2), a TLS certificate/key that cannot be
loaded, a run directory locked by another trainer, no tokens; and ``--new-token --json/--name``."""
from __future__ import annotations

import json
import socket

import pytest

from collafuse.cli import main
from collafuse.server.config import hash_token
from server_fixtures import token_toml


@pytest.fixture
def config_file(tmp_path) -> str:
    p = tmp_path / "server.toml"
    p.write_text(token_toml())
    return str(p)


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Loading the model means the check came too late: fail loudly instead of serving."""
    import collafuse.server.app as app

    def refuse(state):
        raise AssertionError("the model was loaded before the failure was reported")

    monkeypatch.setattr(app, "_load_engine", refuse)


@pytest.fixture
def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("collafuse serve: error: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_port_in_use(capsys, run_dir, config_file, taken_port, workers):
    if workers == "2":
        pytest.importorskip("gunicorn")
    rc = main(["serve", "--run", run_dir, "--config", config_file, "--port", str(taken_port), "--workers", workers])
    assert rc == 2
    _one_line_error(capsys, f"port {taken_port}", "already in use", "--port")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tls_files_that_cannot_be_loaded(capsys, run_dir, config_file, tmp_path, workers):
    if workers == "2":
        pytest.importorskip("gunicorn")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    rc = main(["serve", "--run", run_dir, "--config", config_file, "--port", "0", "--workers", workers,
               "--tls-cert", str(cert), "--tls-key", str(key)])
    assert rc == 2
    _one_line_error(capsys, "cannot load TLS certificate", str(cert))


def test_a_locked_run_refuses_a_second_trainer(capsys, run_dir, config_file, tmp_path):
    import shutil
    import subprocess
    import sys

    own = str(tmp_path / "run")
    shutil.copytree(run_dir, own)
    holder = subprocess.Popen(  # another process holds the run (holders in one process share the lock)
        [sys.executable, "-c", "import sys; from collafuse.run_lock import RunLock; "
         f"RunLock({own!r}, 'collafuse train --out other').acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["serve", "--run", own, "--config", config_file, "--port", "0", "--train"])
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert rc == 2
    _one_line_error(capsys, "in use by", "collafuse train --out other")


def test_no_tokens(capsys, run_dir, tmp_path, taken_port):
    empty = tmp_path / "empty.toml"
    empty.write_text("[server]\nmax_n = 8\nmax_batch_rows = 64\n")
    # checked before the port: the taken port is not what gets reported
    assert main(["serve", "--run", run_dir, "--config", str(empty), "--port", str(taken_port)]) == 2
    _one_line_error(capsys, "no client tokens", "--new-token")


def test_new_token_json_keeps_the_secret_apart_from_the_config_entry(capsys):
    assert main(["serve", "--new-token", "1", "--name", "hospital-b", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert set(doc) == {"token", "client", "name", "sha256", "config_entry"}
    assert doc["client"] == 1 and doc["name"] == "hospital-b" and doc["sha256"] == hash_token(doc["token"])
    assert doc["token"] not in doc["config_entry"]
    assert doc["config_entry"] == f'[[tokens]]\nname = "hospital-b"\nclient = 1\nsha256 = "{doc["sha256"]}"\n'
    assert main(["serve", "--new-token", "0", "--name", "site a\"]\n"]) == 2
    _one_line_error(capsys, "--name must be", "letters, digits")
    assert main(["serve", "--json"]) == 2
    _one_line_error(capsys, "--new-token")
    assert main(["serve", "--new-token", "0", "--name", "site-a"]) == 0  # plain text, named
    assert 'name = "site-a"' in capsys.readouterr().out
