"""HTTP API fuzzing (issue 7): schemathesis generates requests from the server's own OpenAPI
document (positive and negative data, every route), hypothesis adds hostile bodies, headers and
tokens; the server answers each with a non-5xx status and a JSON error for every refusal, and
``/healthz`` is still 200 afterwards.

The app runs on a loopback port in a background thread (schemathesis drives real HTTP through
``requests``; aiohttp is neither ASGI nor WSGI, so its in-process transports do not apply), with
``--train`` on so ``POST /v1/train`` reaches its full validation.

The default suite runs a few hundred generated requests (``FUZZ_EXAMPLES`` per test); the
``slow`` variant runs thousands.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from collafuse.server.config import ServerConfig  # noqa: E402
from collafuse.server.openapi import openapi_document  # noqa: E402
from collafuse_edge.protocol import encode_tensor  # noqa: E402
from server_fixtures import DISABLED_TOKEN, LIMITED_TOKEN, TOKENS, token_entries  # noqa: E402

# The .npy upload body of POST /v1/train travels as raw bytes, like application/octet-stream.
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")

LEVELS = {0: 29, 1: 19, 2: 39}
# Authorization headers: valid tokens of three clients, a rate-limited one, a disabled one,
# unknown/malformed ones, and none at all.
AUTHS = (
    [f"Bearer {t}" for t in TOKENS.values()]
    + [f"Bearer {LIMITED_TOKEN}", f"Bearer {DISABLED_TOKEN}", "Bearer wrong-token", "Bearer ", "Basic dXNlcjpwdw==",
       "bearer " + TOKENS[0], "Bearer  " + TOKENS[1] + "  ", "Token " + TOKENS[0], "", "Bearer\t" + TOKENS[0],
       None]
)


class LiveServer:
    """The app on 127.0.0.1:<free port>, served by its own event loop in a daemon thread."""

    def __init__(self, cfg: ServerConfig):
        from aiohttp import web

        from collafuse.server.app import create_app

        self.app = create_app(cfg)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app, handle_signals=False)
        ready = threading.Event()
        self.error: BaseException | None = None

        async def start() -> None:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as e:  # surfaced to the test below
                self.error = e
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name="fuzz-server", daemon=True)
        self.thread.start()
        ready.wait(120)
        if self.error is not None:
            raise self.error
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while requests.get(self.url + "/readyz", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the fuzz server never became ready"
            time.sleep(0.1)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(run_dir, tmp_path_factory):
    own = str(tmp_path_factory.mktemp("fuzzrun") / "run")
    shutil.copytree(run_dir, own)
    cfg = ServerConfig(own, tokens=token_entries(), max_n=8, max_batch_rows=64, warmup=False, threads=0,
                       train=True, max_train_rows=16, max_pending_batches=8, train_batch_rows=8,
                       train_checkpoint_every=1000)
    server = LiveServer(cfg)
    server.session = requests.Session()
    server.sent = 0
    yield server
    server.session.close()
    server.close()


@pytest.fixture(scope="module")
def schema():
    return schemathesis.openapi.from_dict(openapi_document())


def _header(resp, name: str) -> str:
    """One header of a ``requests`` or schemathesis response (the latter: lower-case → list)."""
    v = resp.headers.get(name) or resp.headers.get(name.lower()) or ""
    return v[0] if isinstance(v, list) else v


def check_answer(status: int, headers_of, text: str, what: str) -> None:
    """The server's contract for any request at all: no 5xx; every 4xx is the JSON error document."""
    assert status < 500, f"{what} → {status} {text[:300]}"
    if status == 400 and headers_of("Content-Type").startswith("text/plain"):
        # aiohttp's HTTP parser refused the message (e.g. a control character in a header value)
        # before any application code ran: its own plain-text 400, not our JSON document.
        return
    if status >= 400:
        doc = json.loads(text)
        assert set(doc) == {"error"} and isinstance(doc["error"]["code"], str) and doc["error"]["message"], \
            f"{what} → {status} without the JSON error document: {text[:300]}"
        if status == 401:
            assert headers_of("WWW-Authenticate").startswith("Bearer"), what


def send_case(live, case, auth: str | None):
    headers = dict(case.headers or {})
    headers.pop("Authorization", None)
    if auth is not None:
        headers["Authorization"] = auth
    case.headers = headers
    try:
        resp = case.call(base_url=live.url, session=live.session, timeout=60)
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeEncodeError, ValueError):
        return None  # refused by requests on our side (a header with a newline, …): nothing was sent
    live.sent += 1
    check_answer(resp.status_code, lambda h: _header(resp, h), resp.text, f"{case.method} {case.formatted_path} headers={headers!r:.200} body={case.body!r:.200}")
    return resp


def run_schema_fuzz(live, schema, mode: GenerationMode, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode), auth=st.sampled_from(AUTHS))
    def fuzz(case, auth):
        send_case(live, case, auth)

    fuzz()


FUZZ_EXAMPLES = 150
SLOW_EXAMPLES = 2500


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schema_fuzz_never_5xx(live, schema, mode):
    before = live.sent
    run_schema_fuzz(live, schema, mode, FUZZ_EXAMPLES)
    assert live.sent - before >= FUZZ_EXAMPLES // 2
    assert live.session.get(live.url + "/healthz", timeout=30).status_code == 200



# ---------------------------------------------------------------------------------------------
# hostile JSON bodies for POST /v1/handoff (schemathesis stays close to the schema; these do not)

FIELDS = ("n", "labels", "seed", "sampler", "steps", "eta", "handoff_level", "client")
json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=5), max_leaves=20)
near_valid = st.fixed_dictionaries(
    {"n": st.integers(-2, 10) | json_values},
    optional={k: (st.integers(-3, 60) | st.lists(st.integers(-2, 12), max_size=10) | json_values)
              for k in FIELDS[1:]} | {"sampler": st.sampled_from(["ddpm", "ddim", "DDIM", ""]) | json_values},
)


def _raw_text(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


hostile_bytes = st.one_of(
    near_valid.map(_raw_text),
    json_values.map(_raw_text),
    st.integers(1, 60_000).map(lambda d: b"[" * d + b"]" * d),  # nesting far past the recursion limit
    st.integers(1, 20_000).map(lambda d: b'{"n":' * d + b"1" + b"}" * d),
    st.integers(1, 30_000).map(lambda d: b'{"n": 1, "labels": [' + b"[" * d),
    st.integers(4000, 20_000).map(lambda d: b'{"n": ' + b"9" * d + b"}"),  # > Python's int-digit limit
    st.sampled_from([b'{"n": NaN}', b'{"n": 1, "eta": Infinity, "sampler": "ddim"}', b'{"n": -Infinity}',
                     b'{"n": 1e999}', b"\xef\xbb\xbf{}", b'{"n": "\\ud800"}', b"\xff\xfe", b"", b"null",
                     b'{"n": 1, "n": 2}', b'{"n": 1, "sampler": "ddim", "eta": 1e-400}']),
    st.binary(max_size=300),
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
                                 "APPLICATION/JSON", "text/plain", "application/x-npy", "multipart/form-data", "", None,
                                 "application/json; boundary=\x7f", "application/jsonx"])


def run_body_fuzz(live, examples: int) -> None:
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=hostile_bytes, ctype=content_types, auth=st.sampled_from(AUTHS[:3] + AUTHS[4:]))
    def fuzz(body, ctype, auth):
        headers = {} if auth is None else {"Authorization": auth}
        if ctype is not None:
            headers["Content-Type"] = ctype
        try:
            r = live.session.post(live.url + "/v1/handoff", data=body, headers=headers, timeout=60)
        except requests.exceptions.InvalidHeader:
            return
        live.sent += 1
        check_answer(r.status_code, lambda h: _header(r, h), r.text, f"POST /v1/handoff {ctype!r} {body[:200]!r}")

    fuzz()


def test_hostile_handoff_bodies_never_5xx(live):
    run_body_fuzz(live, FUZZ_EXAMPLES)
    assert live.session.get(live.url + "/healthz", timeout=30).status_code == 200


def test_deeply_nested_json_is_a_400_not_a_500(live):
    """Regression: json.loads raised RecursionError (→ 500) on a body of 5000 '[' characters."""
    for body in (b"[" * 5000, b'{"n":' * 3000 + b"1" + b"}" * 3000, b"[" * 60_000 + b"]" * 60_000):
        r = live.session.post(live.url + "/v1/handoff", data=body, timeout=60,
                              headers={"Authorization": AUTHS[0], "Content-Type": "application/json"})
        assert r.status_code in (400, 413) and r.json()["error"]["code"] in ("malformed_json", "body_too_large")
