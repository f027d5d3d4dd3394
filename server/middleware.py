"""The one error middleware: every 4xx/5xx leaves as ``{"error": {"code", "message"}}`` JSON.

It covers the views' :class:`ApiError`, aiohttp's own HTTP exceptions (404 unknown route, 405
wrong method, 413 body too large, …) and unexpected exceptions (500, logged with a traceback,
never echoed to the caller). It also counts requests, body bytes and training uploads (by
status and error code) for ``/metrics``.

Slow peers: views read bodies with :func:`read_body` (``body_timeout_s``, then 408 and the
connection closes), and the middleware writes every response itself within ``send_timeout_s``;
a client that does not read its answer has its connection aborted, so its handler and buffers
are freed. Idle connections and ones that never finish their headers are closed by aiohttp after
``keepalive_timeout_s`` (set in :mod:`.serve`).
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from collafuse_edge.protocol import error_body

from .errors import ApiError
from .state import STATE

log = logging.getLogger("collafuse.server")

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests",
    499: "client_closed_request", 500: "internal_error", 502: "bad_gateway", 503: "unavailable",
}


class _MalformedHttpFilter(logging.Filter):
    """aiohttp answers unparseable HTTP (a control character in a header, a broken request line)
    with a plain 400 and logs an ERROR with a traceback each time: a peer could flood the log at
    will. Those records are the client's mistake; they are kept only when aiohttp.server logs at
    debug level (aiohttp already does this itself for a bad method on a fresh connection)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
        return True


_MALFORMED_HTTP_FILTER = _MalformedHttpFilter()


def quiet_malformed_http_logs() -> None:
    """Install the filter above on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if _MALFORMED_HTTP_FILTER not in logger.filters:
        logger.addFilter(_MALFORMED_HTTP_FILTER)


async def read_body(request: web.Request) -> bytes:
    """The whole request body, or ApiError 408 when it does not arrive within ``body_timeout_s``
    (a client that sends its headers and then stalls must not hold a handler forever). A client
    that hangs up mid-body raises ConnectionError, which :func:`error_middleware` counts as 499
    ("client closed request"), logs at debug level and answers with nothing."""
    timeout = request.app[STATE].config.body_timeout_s
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, "request_timeout", f"the request body did not arrive within {timeout:g} s "
                       "(the server's body_timeout_s); send the body right after the headers") from None


async def _send(request: web.Request, resp: web.StreamResponse) -> None:
    await resp.prepare(request)
    await resp.write_eof()


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
        state = request.app.get(STATE)
        if state is None:
            limit = "the configured size"
        elif request.path == "/v1/train":
            limit = f"{state.config.max_train_body_bytes} bytes (max_train_body_bytes)"
        else:
            limit = f"{state.config.max_body_bytes} bytes"
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
    code = "ok"  # the error code of the answer, for the upload counter
    try:
        resp = await handler(request)
    except ApiError as e:
        code = e.code
        resp = json_error(e.status, e.code, e.message, e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _CODES.get(e.status, "client_error" if e.status < 500 else "server_error")
        resp = _from_http_exception(request, e)
    except asyncio.CancelledError:
        raise
    except ConnectionError:  # the peer went away (e.g. mid-body in read_body): not a server fault
        log.debug("client of %s %s closed the connection mid-request", request.method, request.path)
        code = "client_closed_request"
        resp = json_error(499, code, "the client closed the connection mid-request")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        code = "internal_error"
        resp = json_error(500, code, "the server failed to handle the request; see the server log")
    state = request.app.get(STATE)
    if state is not None:
        m = state.metrics
        route = _route_label(request)
        m.requests.labels(route, request.method, str(resp.status)).inc()
        if m.training and route == "/v1/train" and request.method == "POST":
            m.train_uploads.labels(str(resp.status), "accepted" if resp.status == 200 else code).inc()
        if request.content_length:
            m.bytes_in.inc(request.content_length)
        body = getattr(resp, "body", None)
        if isinstance(body, (bytes, bytearray)):
            m.bytes_out.inc(len(body))
    if resp.status == 499:  # nobody to answer: count it, close the transport, send nothing
        if request.transport is not None:
            request.transport.close()
        return resp
    if resp.status == 408:  # the body was not read to its end: the connection cannot be reused
        resp.force_close()
    if state is not None and not resp.prepared:
        timeout = state.config.send_timeout_s
        try:
            await asyncio.wait_for(_send(request, resp), timeout)
        except asyncio.TimeoutError:
            log.warning("aborted the connection of %s %s: the client did not read its %d response within %g s "
                        "(send_timeout_s)", request.method, request.path, resp.status, timeout)
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client went away; aiohttp's own write below sees the same and logs nothing
        else:
            if resp.status == 408 and request.transport is not None:
                request.transport.close()  # flushes the 408, then closes: no lingering on the stalled body
    return resp
