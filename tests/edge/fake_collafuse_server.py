"""A torch-free stand-in for the collafuse server, for the edge client's tests.

It speaks the real protocol (``collafuse_edge.protocol``) for the fixture bundle ``tiny_cond``:
``/v1/info`` describes that bundle's schedule and level, and ``/v1/handoff`` returns the recorded
reference handoff for (seed 7, labels [0 4 9 8]), and ``initial_noise(seed)`` for anything else.
Tests script failures with ``FakeServer.script`` (a list of statuses to answer first).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field

import numpy as np
from aiohttp import web

from collafuse_edge.noise import initial_noise
from collafuse_edge.protocol import (H_CLIENT, H_DTYPE, H_LEVEL, H_MODEL_VERSION, H_SEED, H_SHAPE, NPY_CONTENT_TYPE,
                                     encode_tensor, error_body, format_shape)

from edge_paths import COND, FIXTURES

TOKEN = "edge-test-token"


@dataclass
class FakeServer:
    info: dict
    reference: dict
    max_n: int = 8
    script: list = field(default_factory=list)  # (status, code, headers) answered before real work
    requests: list = field(default_factory=list)  # (path, json body or None)
    level_header: int | None = None  # override the level header (protocol violation tests)

    @classmethod
    def for_cond_bundle(cls) -> "FakeServer":
        manifest = json.loads((COND / "manifest.json").read_text())
        with np.load(FIXTURES / "tiny_cond_reference.npz") as z:
            ref = {k: z[k] for k in z.files}
        info = {
            "api_version": 1, "model_version": "fake@1:000000000000", "step": 1,
            "schedule": manifest["schedule"], "image_shape": manifest["image_shape"],
            "num_classes": manifest["num_classes"], "server_conditioning": "label", "labels_required": True,
            "clients": [{"client": 0, "cut_ratio": 0.2, "client_levels": 20, "handoff_level": 19}],
            "you": {"name": "edge", "client": 0, "cut_ratio": 0.2, "client_levels": 20, "handoff_level": 19,
                    "max_n": 8},
            "samplers": ["ddpm", "ddim"], "limits": {"max_n": 8},
        }
        return cls(info, ref)

    def app(self) -> web.Application:
        app = web.Application()
        app[FAKE_STATE] = self
        app.router.add_get("/v1/info", _info)
        app.router.add_post("/v1/handoff", _handoff)
        return app


FAKE_STATE = web.AppKey("fake_state", FakeServer)


def _json_error(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.json_response(error_body(code, message), status=status, headers=headers)


def _scripted(s: FakeServer) -> web.Response | None:
    if s.script:
        status, code, headers = s.script.pop(0)
        return _json_error(status, code, f"scripted {status}", headers)
    return None


async def _info(request: web.Request) -> web.Response:
    s = request.app[FAKE_STATE]
    s.requests.append(("/v1/info", None))
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        return _json_error(401, "unauthorized", "the bearer token is not valid for this server")
    return _scripted(s) or web.json_response(s.info)


async def _handoff(request: web.Request) -> web.Response:
    s = request.app[FAKE_STATE]
    body = await request.json()
    s.requests.append(("/v1/handoff", body))
    if request.headers.get("Authorization") != f"Bearer {TOKEN}":
        return _json_error(401, "unauthorized", "the bearer token is not valid for this server")
    scripted = _scripted(s)
    if scripted is not None:
        return scripted
    n, seed = body["n"], body.get("seed", 99)
    if not (1 <= n <= s.max_n):
        return _json_error(400, "invalid_n", f"n must lie in [1, {s.max_n}]")
    ref = s.reference
    if seed == int(ref["seed"]) and body.get("labels") == [int(v) for v in ref["labels"]]:
        x = ref["handoff"]
    else:
        x = initial_noise(seed, (n, *s.info["image_shape"]))
    level = s.info["you"]["handoff_level"] if s.level_header is None else s.level_header
    headers = {H_SHAPE: format_shape(x.shape), H_DTYPE: "float32", H_LEVEL: str(level), H_SEED: str(seed),
               H_MODEL_VERSION: s.info["model_version"], H_CLIENT: "0"}
    return web.Response(body=encode_tensor(x), content_type=NPY_CONTENT_TYPE, headers=headers)


@contextlib.contextmanager
def serve_in_thread(app: web.Application):
    """Run ``app`` on 127.0.0.1 in a background thread (for code that calls asyncio.run itself)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 — the ephemeral port
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
