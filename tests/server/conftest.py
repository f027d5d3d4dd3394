"""Fixtures of the server tests: one tiny trained run, loaded once per session."""
from __future__ import annotations

import pytest
import torch

from collafuse.server.config import ServerConfig
from server_fixtures import run_config, token_entries

# Two OpenMP threads on a shared 2-core machine can make one tiny forward take 100× longer.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> str:
    from collafuse.train import train

    d = str(tmp_path_factory.mktemp("run") / "tiny")
    torch.manual_seed(0)
    train(run_config(), d, progress=False)
    return d


@pytest.fixture(scope="session")
def loaded_run(run_dir):
    from collafuse.checkpoint import load_run

    return load_run(run_dir, device="cpu")


@pytest.fixture
def server_config(run_dir) -> ServerConfig:
    return ServerConfig(run_dir, tokens=token_entries(), max_n=8, max_batch_rows=64, warmup=False, threads=0)


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    """A self-signed certificate and key for 127.0.0.1 (skips when openssl is missing)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")
