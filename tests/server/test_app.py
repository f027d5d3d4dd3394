"""The HTTP contract (docs/architecture.md#contracts): routes, auth, limits, JSON errors for every caller mistake."""
from __future__ import annotations

import json

import numpy as np
import pytest

from collafuse.server.app import create_app
from collafuse.server.state import STATE
from collafuse_edge.protocol import (H_CLIENT, H_DTYPE, H_LEVEL, H_MODEL_VERSION, H_SEED, H_SHAPE,
                                     NPY_CONTENT_TYPE, decode_tensor, parse_shape)

from server_fixtures import DISABLED_TOKEN, LIMITED_TOKEN, TOKENS, auth


@pytest.fixture
async def client(aiohttp_client, server_config, loaded_run):
    return await aiohttp_client(create_app(server_config, run=loaded_run))


async def test_health_ready_metrics_openapi(client):
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    r = await client.get("/readyz")
    assert r.status == 200 and (await r.json())["status"] == "ready"
    r = await client.get("/metrics")
    assert r.status == 200 and "collafuse_requests_total" in await r.text()
    r = await client.get("/openapi.json")
    doc = await r.json()
    assert doc["openapi"].startswith("3.") and "/v1/handoff" in doc["paths"]


async def test_info_describes_schedule_levels_and_grant(client, loaded_run):
    r = await client.get("/v1/info", headers=auth(1))
    assert r.status == 200
    info = await r.json()
    from collafuse_edge.schedule import Schedule

    assert Schedule.from_dict(info["schedule"]).same_as(loaded_run.schedule)
    assert info["image_shape"] == [1, 16, 16] and info["num_classes"] == 10
    assert [c["handoff_level"] for c in info["clients"]] == [29, 19, 39]
    assert info["you"] == {"name": "client-1", "client": 1, "cut_ratio": 0.4, "client_levels": 20,
                           "handoff_level": 19, "max_n": 8, "min_handoff_level": None}
    assert info["labels_required"] is True and info["model_version"].startswith("tiny@4:")


async def test_handoff_returns_npy_with_metadata(client, loaded_run):
    r = await client.post("/v1/handoff", json={"n": 3, "labels": [0, 1, 2], "seed": 9}, headers=auth(2))
    assert r.status == 200
    assert r.content_type == NPY_CONTENT_TYPE
    x = decode_tensor(await r.read(), dtype="float32", ndim=4)
    assert x.shape == (3, 1, 16, 16) == parse_shape(r.headers[H_SHAPE])
    assert r.headers[H_DTYPE] == "float32" and r.headers[H_LEVEL] == "39" and r.headers[H_SEED] == "9"
    assert r.headers[H_CLIENT] == "2" and r.headers[H_MODEL_VERSION] == client.app[STATE].model_version
    # no seed: the server draws one and echoes it, and the echo reproduces the result
    r = await client.post("/v1/handoff", json={"n": 1, "labels": [4]}, headers=auth(0))
    seed = int(r.headers[H_SEED])
    a = decode_tensor(await r.read())
    r = await client.post("/v1/handoff", json={"n": 1, "labels": [4], "seed": seed}, headers=auth(0))
    np.testing.assert_array_equal(a, decode_tensor(await r.read()))


def _bearer(tok):
    return {"Authorization": f"Bearer {tok}"}


GOOD = {"n": 2, "labels": [1, 2], "seed": 1}
# (name, method, path, headers, body (dict → JSON, bytes → raw), status, code)
BAD = [
    ("malformed json", "POST", "/v1/handoff", auth(0), b'{"n": 2,', 400, "malformed_json"),
    ("not an object", "POST", "/v1/handoff", auth(0), [1, 2], 400, "bad_request"),
    ("no content type", "POST", "/v1/handoff", auth(0), ("text/plain", b'{"n": 1}'), 415, "unsupported_media_type"),
    ("unknown field", "POST", "/v1/handoff", auth(0), {**GOOD, "nn": 3}, 400, "unknown_field"),
    ("n missing", "POST", "/v1/handoff", auth(0), {"labels": [1]}, 400, "invalid_n"),
    ("n string", "POST", "/v1/handoff", auth(0), {"n": "2", "labels": [1, 2]}, 400, "invalid_n"),
    ("n float", "POST", "/v1/handoff", auth(0), {"n": 2.0, "labels": [1, 2]}, 400, "invalid_n"),
    ("n bool", "POST", "/v1/handoff", auth(0), {"n": True, "labels": [1]}, 400, "invalid_n"),
    ("n zero", "POST", "/v1/handoff", auth(0), {"n": 0, "labels": []}, 400, "invalid_n"),
    ("n negative", "POST", "/v1/handoff", auth(0), {"n": -3, "labels": []}, 400, "invalid_n"),
    ("n over limit", "POST", "/v1/handoff", auth(0), {"n": 9, "labels": [0] * 9}, 400, "invalid_n"),
    ("n over token limit", "POST", "/v1/handoff", _bearer(LIMITED_TOKEN), {"n": 3, "labels": [0] * 3}, 400, "invalid_n"),
    ("labels missing", "POST", "/v1/handoff", auth(0), {"n": 2}, 400, "invalid_labels"),
    ("labels wrong length", "POST", "/v1/handoff", auth(0), {"n": 2, "labels": [1]}, 400, "invalid_labels"),
    ("labels out of range", "POST", "/v1/handoff", auth(0), {"n": 2, "labels": [1, 10]}, 400, "invalid_labels"),
    ("labels negative", "POST", "/v1/handoff", auth(0), {"n": 1, "labels": [-1]}, 400, "invalid_labels"),
    ("labels strings", "POST", "/v1/handoff", auth(0), {"n": 1, "labels": ["1"]}, 400, "invalid_labels"),
    ("seed negative", "POST", "/v1/handoff", auth(0), {**GOOD, "seed": -1}, 400, "invalid_seed"),
    ("seed huge", "POST", "/v1/handoff", auth(0), {**GOOD, "seed": 2**64}, 400, "invalid_seed"),
    ("seed string", "POST", "/v1/handoff", auth(0), {**GOOD, "seed": "7"}, 400, "invalid_seed"),
    ("bad sampler", "POST", "/v1/handoff", auth(0), {**GOOD, "sampler": "euler"}, 400, "invalid_sampler"),
    ("steps with ddpm", "POST", "/v1/handoff", auth(0), {**GOOD, "steps": 5}, 400, "invalid_sampler"),
    ("steps zero", "POST", "/v1/handoff", auth(0), {**GOOD, "sampler": "ddim", "steps": 0}, 400, "invalid_steps"),
    ("eta out of range", "POST", "/v1/handoff", auth(0), {**GOOD, "sampler": "ddim", "eta": 2}, 400, "invalid_eta"),
    ("huge body", "POST", "/v1/handoff", auth(0), {**GOOD, "pad": "x" * 200_000}, 413, "payload_too_large"),
    ("no token", "POST", "/v1/handoff", {}, GOOD, 401, "unauthorized"),
    ("wrong token", "POST", "/v1/handoff", _bearer("not-a-token"), GOOD, 401, "unauthorized"),
    ("wrong scheme", "POST", "/v1/handoff", {"Authorization": f"Basic {TOKENS[0]}"}, GOOD, 401, "unauthorized"),
    ("empty bearer", "GET", "/v1/info", {"Authorization": "Bearer "}, None, 401, "unauthorized"),
    ("info without token", "GET", "/v1/info", {}, None, 401, "unauthorized"),
    ("disabled token", "POST", "/v1/handoff", _bearer(DISABLED_TOKEN), GOOD, 403, "forbidden"),
    ("another level", "POST", "/v1/handoff", auth(0), {**GOOD, "handoff_level": 19}, 403, "level_not_allowed"),
    ("another client", "POST", "/v1/handoff", auth(0), {**GOOD, "client": 1}, 403, "forbidden"),
    ("unknown route", "GET", "/v1/nope", auth(0), None, 404, "not_found"),
    ("unknown root route", "GET", "/admin", {}, None, 404, "not_found"),
    ("train disabled", "POST", "/v1/train", auth(0), GOOD, 404, "training_disabled"),
    ("wrong method handoff", "GET", "/v1/handoff", auth(0), None, 405, "method_not_allowed"),
    ("wrong method info", "DELETE", "/v1/info", auth(0), None, 405, "method_not_allowed"),
    ("wrong method health", "POST", "/healthz", {}, GOOD, 405, "method_not_allowed"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
async def test_bad_requests_get_json_errors(client, case):
    _, method, path, headers, body, status, code = case
    kw: dict = {"headers": dict(headers)}
    if isinstance(body, bytes):
        kw["data"] = body
        kw["headers"]["Content-Type"] = "application/json"
    elif isinstance(body, tuple):
        kw["data"] = body[1]
        kw["headers"]["Content-Type"] = body[0]
    elif body is not None:
        kw["json"] = body
    r = await client.request(method, path, **kw)
    assert r.status == status, await r.text()
    assert r.content_type == "application/json"
    err = (await r.json())["error"]
    assert err["code"] == code and err["message"]
    for tok in (*TOKENS.values(), LIMITED_TOKEN, DISABLED_TOKEN):
        assert tok not in err["message"]
    if status == 401:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    if status == 405:
        assert "Allow" in r.headers
    r = await client.get("/healthz")
    assert r.status == 200


async def test_rate_limit_and_quota(client):
    h = _bearer(LIMITED_TOKEN)
    for _ in range(2):
        r = await client.post("/v1/handoff", json={"n": 2, "labels": [0, 1], "seed": 1}, headers=h)
        assert r.status == 200
    r = await client.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=h)
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    grant = client.app[STATE].tokens.lookup(LIMITED_TOKEN)
    grant.bucket.tokens = 5.0  # refill the bucket; the daily quota (5 images, 4 used) remains
    r = await client.post("/v1/handoff", json={"n": 2, "labels": [0, 1]}, headers=h)
    assert r.status == 429 and (await r.json())["error"]["code"] == "quota_exceeded"
    r = await client.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=h)
    assert r.status == 200


async def test_metrics_count_requests_batches_and_bytes(client):
    await client.post("/v1/handoff", json={"n": 2, "labels": [0, 1]}, headers=auth(0))
    await client.get("/nope")
    text = await (await client.get("/metrics")).text()
    assert 'collafuse_requests_total{method="POST",route="/v1/handoff",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    for name in ("collafuse_batch_rows_bucket", "collafuse_step_seconds_bucket", "collafuse_queue_waiting",
                 'collafuse_http_bytes_total{direction="in"}', 'collafuse_http_bytes_total{direction="out"}',
                 "collafuse_handoff_seconds_bucket"):
        assert name in text
    assert 'collafuse_handoff_images_total{client="client-0"} 2.0' in text


async def test_unconditional_server_refuses_labels(aiohttp_client, server_config, loaded_run):
    import dataclasses

    from collafuse.config import replace

    run = dataclasses.replace(loaded_run, config=replace(loaded_run.config, server_conditioning="none"))
    # the tiny server model was trained with labels; for this check the engine never runs
    c = await aiohttp_client(create_app(server_config, run=run))
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [3]}, headers=auth(0))
    assert r.status == 400 and "labels are disclosure" in (await r.json())["error"]["message"]
    info = await (await c.get("/v1/info", headers=auth(0))).json()
    assert info["labels_required"] is False


async def test_drain_finishes_in_flight_and_refuses_new(aiohttp_client, server_config, loaded_run):
    import asyncio

    from collafuse.server.app import _drain

    c = await aiohttp_client(create_app(server_config, run=loaded_run))
    inflight = asyncio.ensure_future(c.post("/v1/handoff", json={"n": 2, "labels": [0, 1], "seed": 3},
                                            headers=auth(2)))
    await asyncio.sleep(0.05)
    drain = asyncio.ensure_future(_drain(c.app))
    await asyncio.sleep(0)
    r = await c.get("/readyz")
    assert r.status == 503 and (await r.json())["error"]["code"] == "not_ready"
    r = await c.post("/v1/handoff", json={"n": 1, "labels": [0]}, headers=auth(0))
    assert r.status == 503
    r = await inflight
    assert r.status == 200 and decode_tensor(await r.read()).shape == (2, 1, 16, 16)
    await drain


def test_config_errors_fail_fast(run_dir):
    from collafuse.server.config import ServerConfig, TokenEntry, hash_token
    from collafuse.server.errors import ServerConfigError

    with pytest.raises(ServerConfigError, match="no client tokens"):
        create_app(ServerConfig(run_dir))
    with pytest.raises(ServerConfigError, match="client 7 does not exist"):
        create_app(ServerConfig(run_dir, tokens=(TokenEntry(hash_token("a"), client=7),)))
    with pytest.raises(ServerConfigError, match="not one of the run's handoff levels"):
        create_app(ServerConfig(run_dir, tokens=(TokenEntry(hash_token("a"), client=0, cut_ratio=0.5),)))
    # a token may bind another of the run's levels explicitly
    create_app(ServerConfig(run_dir, tokens=(TokenEntry(hash_token("a"), client=0, cut_ratio=0.4),)))


def test_openapi_file_in_repo_is_current():
    import os

    from collafuse.server.openapi import openapi_document

    path = os.path.join(os.path.dirname(__file__), "..", "..", "server", "openapi.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(openapi_document())), \
        "server/openapi.json is stale: python -m collafuse.server.openapi > server/openapi.json"


async def test_every_route_is_documented(client):
    from collafuse.server.openapi import openapi_document

    doc = openapi_document()["paths"]
    for route in client.app.router.routes():
        path = route.resource.canonical
        assert path in doc and route.method.lower() in doc[path], f"{route.method} {path} undocumented"
