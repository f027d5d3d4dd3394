"""The one error middleware: every 4xx/5xx leaves as ``{"error": {"code", "message"}}`` JSON.

It covers the views' :class:`ApiError`, aiohttp's own HTTP exceptions (404 unknown route, 405
wrong method, 413 body too large, …) and unexpected exceptions (500, logged with a traceback,
never echoed to the caller). It also counts requests and bytes for ``/metrics``.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from collafuse_edge.protocol import error_body

from .errors import ApiError

log = logging.getLogger("collafuse.server")

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests",
    500: "internal_error", 502: "bad_gateway", 503: "unavailable",
}


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(code, message), status=status, headers=headers)


def _from_http_exception(request: web.Request, e: web.HTTPException) -> web.Response:
    status = e.status
    code = _CODES.get(status, "client_error" if status < 500 else "server_error")
    headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
    if status == 404:
        message = f"no route {request.method} {request.path}; see GET /openapi.json for the API"
    elif status == 405:
        allowed = ", ".join(sorted(getattr(e, "allowed_methods", ()) or ()))
        message = f"method {request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif status == 413:
        from .app import STATE

        state = request.app.get(STATE)
        limit = f"{state.config.max_body_bytes} bytes" if state is not None else "the configured size"
        message = f"request body too large; the limit is {limit}"
    else:
        message = e.text if e.text and not e.text.startswith(f"{status}:") else e.reason
    return json_error(status, code, message, headers)


def _route_label(request: web.Request) -> str:
    """The route template (bounded label set): unmatched paths all count as 'unmatched'."""
    info = request.match_info
    resource = getattr(info.route, "resource", None) if info is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    from .app import STATE

    try:
        resp = await handler(request)
    except ApiError as e:
        resp = json_error(e.status, e.code, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = _from_http_exception(request, e)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        resp = json_error(500, "internal_error", "the server failed to handle the request; see the server log")
    state = request.app.get(STATE)
    if state is not None:
        m = state.metrics
        m.requests.labels(_route_label(request), request.method, str(resp.status)).inc()
        if request.content_length:
            m.bytes_in.inc(request.content_length)
        body = getattr(resp, "body", None)
        if isinstance(body, (bytes, bytearray)):
            m.bytes_out.inc(len(body))
    return resp
