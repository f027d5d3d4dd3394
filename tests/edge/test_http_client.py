"""The async HTTP client against an in-process fake server (torch-free; runs in the edge-only venv)."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from edge_paths import COND
from fake_collafuse_server import TOKEN, FakeServer

from collafuse_edge import EdgeRuntime, SamplerConfig
from collafuse_edge.errors import BundleError, InputError, ProtocolError, ServerError
from collafuse_edge.http_client import ClientConfig, ServerClient, generate_over_http

FAST = dict(backoff_s=0.01, max_backoff_s=0.02, retries=3)


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer.for_cond_bundle()


@pytest.fixture
async def url(aiohttp_server, fake) -> str:
    server = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture(scope="module")
def runtime() -> EdgeRuntime:
    return EdgeRuntime.open(COND)


def handoffs(fake):
    return [b for p, b in fake.requests if p == "/v1/handoff"]


async def test_generate_over_http_equals_reference(url, fake, runtime):
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        images = await generate_over_http(runtime, server, 4, fake.reference["labels"], seed=7)
    np.testing.assert_allclose(images, fake.reference["ddpm"], atol=1e-5, rtol=0)
    assert fake.requests[0] == ("/v1/info", None)  # checked the bundle first
    assert handoffs(fake) == [{"n": 4, "labels": [0, 4, 9, 8], "seed": 7}]


async def test_token_from_environment(url, fake, monkeypatch):
    monkeypatch.setenv("COLLAFUSE_TOKEN", TOKEN)
    async with ServerClient(ClientConfig(url)) as server:
        h = await server.handoff(2, [1, 2], seed=3)
    assert h.samples.shape == (2, 1, 8, 8) and h.level == 19 and h.seed == 3
    monkeypatch.delenv("COLLAFUSE_TOKEN")
    with pytest.raises(InputError, match="COLLAFUSE_TOKEN"):
        ServerClient(ClientConfig(url))


async def test_wrong_token_is_a_clear_401_without_retries(url, fake):
    async with ServerClient(ClientConfig(url, token="wrong-secret", **FAST)) as server:
        with pytest.raises(ServerError) as e:
            await server.info()
    assert e.value.status == 401 and "check --token" in str(e.value) and "wrong-secret" not in str(e.value)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status,code", [(400, "invalid_labels"), (403, "level_not_allowed"), (404, "not_found")])
async def test_client_errors_are_not_retried(url, fake, status, code):
    async with ServerClient(ClientConfig(url, token=TOKEN, **FAST)) as server:
        await server.info()
        fake.script = [(status, code, None)]
        with pytest.raises(ServerError) as e:
            await server.handoff(1, [0], seed=1)
    assert e.value.status == status and e.value.code == code and f"{status} {code}" in str(e.value)
    assert len(handoffs(fake)) == 1


async def test_5xx_and_429_are_retried_with_backoff(url, fake):
    async with ServerClient(ClientConfig(url, token=TOKEN, **FAST)) as server:
        await server.info()
        fake.script = [(503, "overloaded", {"Retry-After": "0"}), (500, "internal_error", None),
                       (429, "rate_limited", {"Retry-After": "0"})]
        h = await server.handoff(1, [0], seed=5)
    assert h.samples.shape == (1, 1, 8, 8)
    assert len(handoffs(fake)) == 4


async def test_retries_give_up_with_the_last_error(url, fake):
    async with ServerClient(ClientConfig(url, token=TOKEN, **FAST)) as server:
        await server.info()
        fake.script = [(503, "overloaded", None)] * 10
        with pytest.raises(ServerError, match="503 overloaded"):
            await server.handoff(1, [0], seed=5)
    assert len(handoffs(fake)) == 4  # 1 + 3 retries


async def test_quota_and_long_retry_after_are_raised_at_once(url, fake):
    async with ServerClient(ClientConfig(url, token=TOKEN, **FAST)) as server:
        await server.info()
        fake.script = [(429, "quota_exceeded", {"Retry-After": "40000"})]
        with pytest.raises(ServerError, match="quota_exceeded"):
            await server.handoff(1, [0], seed=5)
        fake.script = [(429, "rate_limited", {"Retry-After": "3600"})]
        with pytest.raises(ServerError, match="rate_limited"):
            await server.handoff(1, [0], seed=5)
    assert len(handoffs(fake)) == 2


async def test_connection_refused_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with ServerClient(ClientConfig(f"http://127.0.0.1:{port}", token=TOKEN, **FAST)) as server:
        with pytest.raises(ServerError, match="could not reach the server .* after 4 attempts"):
            await server.info()


@pytest.mark.parametrize("edit,match", [
    (lambda i: i["you"].update(handoff_level=29, client_levels=30), "handoff level differs"),
    (lambda i: i["schedule"].update(betas=[b * 1.01 for b in i["schedule"]["betas"]]), "schedule differs"),
    (lambda i: i.update(image_shape=[1, 16, 16]), "image shape differs"),
    (lambda i: i.update(num_classes=3), "number of classes differs"),
])
async def test_mismatched_bundle_is_refused_before_any_compute(url, fake, runtime, edit, match):
    edit(fake.info)
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        with pytest.raises(BundleError, match=match):
            await generate_over_http(runtime, server, 2, seed=0)
    assert handoffs(fake) == []


async def test_wrong_level_in_response_is_a_protocol_error(url, fake):
    fake.level_header = 18
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        with pytest.raises(ProtocolError, match="level '18'"):
            await server.handoff(1, [0], seed=1)


async def test_labels_only_sent_when_the_server_takes_them(url, fake):
    fake.info["labels_required"] = False
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        await server.handoff(2, [3, 4], seed=1)
    assert handoffs(fake) == [{"n": 2, "seed": 1}]


async def test_more_than_max_n_is_chunked_with_consecutive_seeds(url, fake, runtime):
    fake.info["you"]["max_n"] = 3
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        images = await generate_over_http(runtime, server, 7, 5, seed=10, sampler=SamplerConfig("ddim", 3),
                                          concurrency=2)
    assert images.shape == (7, 1, 8, 8) and np.all(np.abs(images) <= 1)
    sent = sorted((b["seed"], b["n"]) for b in handoffs(fake))
    assert sent == [(10, 3), (11, 3), (12, 1)]


def test_config_validation():
    with pytest.raises(InputError, match="server URL"):
        ClientConfig("gpu-box:8080", token="t")
    with pytest.raises(InputError, match="retries"):
        ClientConfig("http://h:1", token="t", retries=-1)
    assert "t0k3n" not in repr(ClientConfig("http://h:1", token="t0k3n"))


async def test_n_is_checked_against_the_token_limit(url, fake):
    async with ServerClient(ClientConfig(url, token=TOKEN)) as server:
        with pytest.raises(InputError, match=r"\[1, 8\]"):
            await server.handoff(9, [0] * 9, seed=1)
    assert handoffs(fake) == []


def test_cli_generate_from_server(tmp_path, monkeypatch, capsys):
    """``collafuse-edge generate --server URL`` (token from $COLLAFUSE_TOKEN) writes the reference images."""
    from fake_collafuse_server import serve_in_thread

    from collafuse_edge.cli import main

    fake = FakeServer.for_cond_bundle()
    out = tmp_path / "img.npy"
    with serve_in_thread(fake.app()) as url:
        monkeypatch.setenv("COLLAFUSE_TOKEN", TOKEN)
        rc = main(["generate", "--bundle", str(COND), "--server", url, "-n", "4", "--seed", "7",
                   "--labels", "0,4,9,8", "--out", str(out), "--sampler", "ddpm"])
        assert rc == 0, capsys.readouterr().err
        np.testing.assert_allclose(np.load(out), fake.reference["ddpm"], atol=1e-5, rtol=0)
        assert "sampler" not in handoffs(fake)[-1]  # ddpm on both sides
        # the default sampler (ddim) runs on both sides; --server-steps goes to the server
        rc = main(["generate", "--bundle", str(COND), "--server", url, "-n", "2", "--server-steps", "7",
                   "--client-steps", "5", "--out", str(tmp_path / "ddim.npy")])
        assert rc == 0, capsys.readouterr().err
        assert handoffs(fake)[-1]["sampler"] == "ddim" and handoffs(fake)[-1]["steps"] == 7
        rc = main(["generate", "--bundle", str(COND), "--server", url, "-n", "1", "--token", "nope",
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and "rejected the token" in err and "nope" not in err
        rc = main(["generate", "--bundle", str(COND), "--server", url, "--out", str(out)])
        assert rc == 2 and "--server needs -n" in capsys.readouterr().err  # bad input
