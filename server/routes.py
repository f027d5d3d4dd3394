"""The route table, in one place (:func:`setup_routes`), and the views of serving.

Unauthenticated: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /openapi.json``.
Bearer token required: ``GET /v1/info``, ``POST /v1/handoff``, ``POST /v1/train`` (its view lives
in :mod:`.train_routes`). Views translate domain errors into :class:`ApiError`.
"""
from __future__ import annotations

import json

from aiohttp import web

from collafuse_edge.protocol import (H_CLIENT, H_DTYPE, H_LEVEL, H_MODEL_VERSION, H_QUEUE_MS, H_SAMPLER, H_SEED,
                                     H_SHAPE, H_STEPS, NPY_CONTENT_TYPE, encode_tensor, format_shape)
from collafuse_edge.schedule import SAMPLERS, client_level_count

from .auth import Grant, charge
from .errors import ApiError, EngineBusy, EngineClosed, bad_request
from .handoff_params import parse_handoff
from .middleware import read_body
from .openapi import API_VERSION, openapi_document
from .prometheus import CONTENT_TYPE_LATEST
from .state import ServerState, require_grant, state_of
from .train_routes import v1_train


async def read_json(request: web.Request):
    """The JSON body, or 400/413/415 with a message that says what was wrong."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with Content-Type: application/json "
                       f"(got {request.content_type or 'none'})")
    raw = await read_body(request)  # aiohttp raises 413 beyond client_max_size; 408 on a stalled body
    limit = state_of(request).config.max_body_bytes
    if len(raw) > limit:  # client_max_size may be larger when training uploads are on
        raise ApiError(413, "body_too_large", f"the body is {len(raw)} bytes; the limit is {limit}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", "malformed_json") from None
    except RecursionError:  # "[[[[…" a few thousand deep: the C decoder gives up, not a 500
        raise bad_request("the body is not valid JSON: nested too deeply", "malformed_json") from None


# ---------------------------------------------------------------------------------------------
# operations


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Never needs the model."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    s = state_of(request)
    if s.ready:
        return web.json_response({"status": "ready", "model_version": s.model_version,
                                  "waiting": s.engine.waiting, "active": s.engine.active})
    why = "draining for shutdown" if s.draining else "loading the model"
    raise ApiError(503, "not_ready", f"the server is {why}", {"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    s = state_of(request)
    if s.trainer is not None:
        s.metrics.observe_trainer(s.trainer)
    resp = web.Response(body=s.metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


# ---------------------------------------------------------------------------------------------
# /v1


def info_document(s: ServerState, grant: Grant) -> dict:
    cfg = s.run_config
    T = cfg.schedule.num_train_timesteps
    clients = [{"client": i, "cut_ratio": c, "client_levels": client_level_count(c, T),
                "handoff_level": client_level_count(c, T) - 1} for i, c in enumerate(cfg.cut_ratios)]
    return {
        "api_version": API_VERSION,
        "model_version": s.model_version,
        "step": s.step,
        "schedule": s.schedule_doc,
        "image_shape": list(s.sample_shape),
        "num_classes": s.data.num_classes,
        "server_conditioning": cfg.server_conditioning,
        "labels_required": s.conditional,
        "clients": clients,
        "you": {"name": grant.name, "client": grant.client, "cut_ratio": grant.cut_ratio,
                "client_levels": grant.client_levels, "handoff_level": grant.handoff_level,
                "max_n": grant.max_n, "min_handoff_level": grant.min_handoff_level},
        "samplers": list(SAMPLERS),
        "limits": {"max_n": grant.max_n, "max_body_bytes": s.config.max_body_bytes,
                   "max_batch_rows": s.config.max_batch_rows},
        "serving": {"device": s.device, "accel": s.accel, "batching": s.config.batching},
        "training": s.training_progress() if s.trainer is not None else {"enabled": False},
        "tensor_format": {"content_type": NPY_CONTENT_TYPE, "dtype": "float32",
                          "headers": [H_SHAPE, H_DTYPE, H_LEVEL, H_MODEL_VERSION, H_SEED, H_CLIENT,
                                      H_STEPS, H_SAMPLER]},
    }


async def v1_info(request: web.Request) -> web.Response:
    grant = require_grant(request)
    return web.json_response(info_document(state_of(request), grant))


async def v1_handoff(request: web.Request) -> web.Response:
    s = state_of(request)
    grant = require_grant(request)
    body = await read_json(request)
    spec = parse_handoff(body, grant, T=s.run_config.schedule.num_train_timesteps,
                         num_classes=s.data.num_classes, conditional=s.conditional)
    if s.engine is None or not s.ready:
        why = "draining for shutdown" if s.draining else "loading the model"
        raise ApiError(503, "not_ready", f"the server is {why}; retry shortly", {"Retry-After": "1"})
    charge(grant, spec.n)
    try:
        res = await s.engine.submit(spec)
    except EngineBusy as e:
        raise ApiError(503, "overloaded", str(e), {"Retry-After": "1"}) from None
    except EngineClosed as e:
        raise ApiError(503, "not_ready", str(e), {"Retry-After": "1"}) from None
    s.metrics.handoff_seconds.observe(res.total_s)
    s.metrics.images.labels(grant.name).inc(spec.n)
    data = encode_tensor(res.samples)
    headers = {
        H_SHAPE: format_shape(res.samples.shape),
        H_DTYPE: str(res.samples.dtype),
        H_LEVEL: str(res.level),
        H_MODEL_VERSION: s.model_version,
        H_SEED: str(res.seed),
        H_CLIENT: str(grant.client),
        H_STEPS: str(res.steps),
        H_SAMPLER: spec.sampler,
        H_QUEUE_MS: f"{res.queued_s * 1e3:.1f}",
    }
    return web.Response(body=data, content_type=NPY_CONTENT_TYPE, headers=headers)


ROUTES = [
    web.get("/healthz", healthz, allow_head=False),
    web.get("/readyz", readyz, allow_head=False),
    web.get("/metrics", metrics, allow_head=False),
    web.get("/openapi.json", openapi, allow_head=False),
    # /v1: every view starts with require_grant (bearer token)
    web.get("/v1/info", v1_info, allow_head=False),
    web.post("/v1/handoff", v1_handoff),
    web.post("/v1/train", v1_train),  # 404 training_disabled unless the server trains (--train)
]


def setup_routes(app: web.Application) -> None:
    """Register every route of the server on ``app``."""
    app.add_routes(ROUTES)


__all__ = ["ROUTES", "require_grant", "setup_routes"]
