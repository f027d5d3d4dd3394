"""Async HTTP client of the collafuse server (aiohttp + numpy; never torch).

It fetches handoff samples (the server's levels T-1 … k) and hands them to the edge runtime,
which runs the client's levels k-1 … 0 with the exported bundle. Before any compute it reads
``GET /v1/info`` and refuses a bundle whose schedule, handoff level, image shape or classes
differ from what the server serves.

Example::

    async with ServerClient(ClientConfig("http://gpu-box:8080")) as server:   # token: $COLLAFUSE_TOKEN
        rt = EdgeRuntime.open("bundle/")
        images = await generate_over_http(rt, server, n=16, seed=0)

Protocol (see also :mod:`collafuse_edge.protocol` and the server's ``/openapi.json``):

* ``Authorization: Bearer <token>``; the token binds this client's id and handoff level.
* ``POST /v1/handoff`` with JSON ``{"n", "labels"?, "seed"?, "sampler"?, "steps"?, "eta"?}`` returns
  ``.npy`` float32 ``[n, C, H, W]`` at level k-1, with ``X-Collafuse-Level`` and ``-Seed`` headers.
* The noise of a request is keyed by (seed, level, shape): the client draws its own levels' noise
  from the same seed, so a request of ``n`` images equals in-process ``split_sample(n, seed)``.
  Requests above the server's ``max_n`` are split into chunks with seeds ``seed, seed+1, …``.
* Connection errors, 5xx and 429 (rate limit) are retried with exponential backoff and jitter,
  honouring ``Retry-After``; other 4xx are raised at once with the server's message.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import ssl
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from .errors import InputError, ProtocolError, ServerError
from .protocol import H_LEVEL, H_MODEL_VERSION, H_SEED, NPY_CONTENT_TYPE, decode_tensor
from .schedule import Schedule
from .validation import check_int, is_int, is_number

ENV_TOKEN = "COLLAFUSE_TOKEN"
API_VERSION = 1
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the server. The token is read from ``$COLLAFUSE_TOKEN`` when not given."""

    url: str  # e.g. "http://127.0.0.1:8080" (a path prefix behind a proxy is kept)
    token: Optional[str] = field(default=None, repr=False)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 600.0  # one handoff may wait in the queue and run every server level
    retries: int = 4  # extra attempts after the first on connection errors, 5xx and 429
    backoff_s: float = 0.5  # first wait; doubles per attempt (with jitter) up to max_backoff_s
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0  # a longer Retry-After (e.g. a daily quota) is raised, not waited
    ca_file: Optional[str] = None  # PEM bundle to verify a self-signed server certificate

    def __post_init__(self) -> None:
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"server URL must look like http://HOST:PORT or https://HOST:PORT, got {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        for name in ("connect_timeout_s", "read_timeout_s", "backoff_s", "max_backoff_s", "max_retry_after_s"):
            v = getattr(self, name)
            if not is_number(v) or not (v > 0):
                raise InputError(f"{name} must be a positive number of seconds, got {v!r}")
        check_int("retries", self.retries, low=0)
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise InputError(f"ca_file {self.ca_file!r} is not a file")

    def resolve_token(self) -> str:
        token = self.token if self.token is not None else os.environ.get(ENV_TOKEN)
        if not token or not token.strip():
            raise InputError(f"no server token: pass --token TOKEN or set {ENV_TOKEN}")
        return token.strip()


@dataclass(frozen=True)
class ServerInfo:
    """``GET /v1/info``, parsed. ``raw`` keeps the whole document."""

    model_version: str
    schedule: Schedule
    image_shape: tuple[int, int, int]
    num_classes: Optional[int]
    labels_required: bool
    client: int
    client_levels: int  # k of this token's client
    handoff_level: int  # k-1
    max_n: int
    raw: dict = field(repr=False)

    @classmethod
    def from_json(cls, doc: Any, url: str) -> "ServerInfo":
        try:
            if doc.get("api_version") != API_VERSION:
                raise ProtocolError(f"the server speaks API version {doc.get('api_version')!r}; "
                                    f"this collafuse-edge speaks {API_VERSION}")
            you = doc["you"]
            return cls(
                model_version=str(doc["model_version"]),
                schedule=Schedule.from_dict(doc["schedule"]),
                image_shape=tuple(int(v) for v in doc["image_shape"]),
                num_classes=None if doc["num_classes"] is None else int(doc["num_classes"]),
                labels_required=bool(doc["labels_required"]),
                client=int(you["client"]),
                client_levels=int(you["client_levels"]),
                handoff_level=int(you["handoff_level"]),
                max_n=int(you["max_n"]),
                raw=doc,
            )
        except ProtocolError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"{url}/v1/info is not a collafuse server description ({e!r})") from e


def _error_message(status: int, code: str | None, message: str, url: str) -> str:
    detail = f"{status} {code}: {message}" if code else f"{status}: {message}"
    if status == 401:
        return f"the server at {url} rejected the token ({detail}); check --token or ${ENV_TOKEN}"
    if status == 403:
        return f"the server at {url} does not allow this for this token ({detail})"
    if status == 404:
        return f"{url} has no such route ({detail}); is it a collafuse server speaking API v{API_VERSION}?"
    if status == 429:
        return f"the server at {url} limits this token ({detail})"
    if status >= 500:
        return f"the server at {url} failed ({detail})"
    return f"the server at {url} refused the request ({detail})"


class ServerClient:
    """One connection pool to one server. Use as ``async with``; or call :meth:`close`."""

    def __init__(self, config: ClientConfig, *, session: aiohttp.ClientSession | None = None):
        self.config = config
        self._token = config.resolve_token()
        self._session = session
        self._owns_session = session is None
        self._info: ServerInfo | None = None
        self.requests = 0  # HTTP attempts made (for logs/tests: retries = requests - calls)
        self.retries = 0  # attempts that were repeats after a connection error, timeout, 5xx or 429

    async def __aenter__(self) -> "ServerClient":
        self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            c = self.config
            # Always an explicit verifying context for https: aiohttp before 3.10 reads ssl=True as
            # "do not verify" (make test-edge-oldest caught a self-signed server accepted on 3.9.0)
            sslctx: ssl.SSLContext | bool = True
            if c.url.startswith("https://"):
                sslctx = ssl.create_default_context(cafile=c.ca_file)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=c.connect_timeout_s, sock_read=c.read_timeout_s),
                connector=aiohttp.TCPConnector(ssl=sslctx),
            )
        return self._session

    # -- transport -------------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        c = self.config
        base = min(c.max_backoff_s, c.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)  # jitter: retries of many clients spread out

    async def _request(self, method: str, path: str, body: dict | None = None) -> tuple[Any, bytes]:
        """(headers, body) of a 200 answer; ServerError for anything else (after retries)."""
        session = self._ensure_session()
        url = self.config.url + path
        headers = {"Authorization": f"Bearer {self._token}", "Accept": f"{NPY_CONTENT_TYPE}, application/json"}
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            self.requests += 1
            self.retries += attempt > 0
            try:
                async with session.request(method, url, json=body, headers=headers) as resp:
                    data = await resp.read()
                    if resp.status == 200:
                        return resp.headers, data
                    code, message = _parse_error(resp.status, resp.content_type, data)
                    err = ServerError(_error_message(resp.status, code, message, self.config.url),
                                      status=resp.status, code=code)
                    if resp.status not in RETRY_STATUSES or last or code == "quota_exceeded":
                        raise err
                    delay = self._delay(attempt)
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    if retry_after is not None:
                        if retry_after > self.config.max_retry_after_s:
                            raise err
                        delay = max(delay, retry_after)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if last or isinstance(e, aiohttp.ClientSSLError) and not self._maybe_transient_tls(e):
                    raise ServerError(f"could not reach the server at {self.config.url} after {attempt + 1} "
                                      f"attempts: {type(e).__name__}: {e}{self._hint(e)}") from e
                delay = self._delay(attempt)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _maybe_transient_tls(e: Exception) -> bool:
        """A TLS failure worth retrying? A wrong scheme or an untrusted certificate never heals."""
        text = str(e).lower()
        return not any(w in text for w in ("wrong_version_number", "certificate", "record layer", "wrong version"))

    def _hint(self, e: Exception) -> str:
        """What a connection failure most likely means, in words."""
        https = self.config.url.startswith("https://")
        if isinstance(e, aiohttp.ClientSSLError):
            text = str(e).lower()
            if https and ("wrong_version_number" in text or "record layer" in text or "wrong version" in text):
                return (" — the server answered in plain HTTP, not TLS: use an http:// URL, or start the server "
                        "with --tls-cert/--tls-key")
            if "certificate" in text:
                return (" — the server's TLS certificate is not trusted: for a self-signed or private CA, pass "
                        "--ca-file PEM (the CA or server certificate; ClientConfig(ca_file=PEM) in Python)")
            return ""
        if isinstance(e, aiohttp.ServerDisconnectedError) and not https:
            return (" — the server closed the connection without an answer: if it serves HTTPS, use an https:// "
                    "URL; otherwise it may have crashed or restarted")
        if isinstance(e, asyncio.TimeoutError):
            return (f" — no answer within read_timeout_s={self.config.read_timeout_s:g} s "
                    f"(connect_timeout_s={self.config.connect_timeout_s:g} s)")
        return ""

    # -- API -------------------------------------------------------------------------------

    async def info(self, refresh: bool = False) -> ServerInfo:
        """``GET /v1/info`` (cached)."""
        if self._info is None or refresh:
            import json

            _, data = await self._request("GET", "/v1/info")
            try:
                doc = json.loads(data)
            except ValueError as e:
                raise ProtocolError(f"{self.config.url}/v1/info did not return JSON ({e})") from e
            self._info = ServerInfo.from_json(doc, self.config.url)
        return self._info

    async def check_bundle(self, bundle) -> ServerInfo:
        """Refuse (BundleError) a bundle that does not match the server, before any compute."""
        info = await self.info()
        bundle.check_compatible(
            schedule=info.schedule, handoff_level=info.handoff_level, image_shape=info.image_shape,
            num_classes=info.num_classes if bundle.num_classes is not None else None,
            source=f"the server at {self.config.url}",
        )
        return info

    async def handoff(
        self, n: int, labels: Sequence[int] | np.ndarray | None = None, seed: int | None = None, *,
        sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
    ):
        """``n`` handoff samples as a :class:`collafuse_edge.runtime.Handoff` (checked: shape, level, seed).

        ``labels`` are sent only when the server conditions on them (they are disclosure otherwise).
        """
        from .runtime import Handoff

        info = await self.info()
        if not is_int(n) or not (1 <= n <= info.max_n):
            raise InputError(f"n must be an integer in [1, {info.max_n}] (this token's max_n), got {n!r}")
        body: dict[str, Any] = {"n": int(n)}
        lab = None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if info.labels_required:
            if lab is None:
                raise InputError(f"the server conditions on class labels: pass {n} labels in "
                                 f"[0, {info.num_classes - 1}]")
            body["labels"] = [int(v) for v in lab]
        if seed is not None:
            if not is_int(seed) or not (0 <= seed <= MAX_SEED):
                raise InputError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
            body["seed"] = int(seed)
        if sampler != "ddpm":
            body["sampler"] = sampler
            if steps is not None:
                body["steps"] = int(steps)
            if eta:
                body["eta"] = float(eta)
        elif steps is not None or eta:
            raise InputError("server steps/eta apply to the ddim sampler only")
        headers, data = await self._request("POST", "/v1/handoff", body)
        x = decode_tensor(data, dtype="float32", ndim=4, shape_tail=info.image_shape,
                          max_bytes=max(64 * 2**20, 4 * n * math.prod(info.image_shape) + 4096))
        if x.shape[0] != n:
            raise ProtocolError(f"asked the server for {n} samples, got {x.shape[0]}")
        try:
            level = int(headers.get(H_LEVEL, ""))
        except ValueError:
            level = None
        if level != info.handoff_level:
            raise ProtocolError(f"the server returned samples at level {headers.get(H_LEVEL)!r}, expected "
                                f"this client's handoff level {info.handoff_level}")
        got_seed = headers.get(H_SEED, "")
        # isascii: str.isdigit() also accepts digits like "²" that int() refuses
        if not (got_seed.isascii() and got_seed.isdigit()) or (seed is not None and int(got_seed) != seed):
            raise ProtocolError(f"the server echoed seed {got_seed!r} for a request with seed {seed!r}")
        version = headers.get(H_MODEL_VERSION)
        if version is not None and version != info.model_version:
            # another replica with other weights answered: the info we checked no longer holds
            raise ProtocolError(f"the server's model changed from {info.model_version} to {version} "
                                "between requests; retry to re-check the bundle against it")
        return Handoff(x, level, int(got_seed), lab)

    def source(self, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0):
        """A :data:`collafuse_edge.runtime.HandoffSource` for ``EdgeRuntime.agenerate``."""

        async def get(n: int, labels: Optional[np.ndarray], seed: int):
            return await self.handoff(n, labels, seed, sampler=sampler, steps=steps, eta=eta)

        return get


def _parse_error(status: int, content_type: str, data: bytes) -> tuple[str | None, str]:
    if content_type == "application/json":
        try:
            import json

            err = json.loads(data)["error"]
            return str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            pass
    text = data.decode("utf-8", "replace").strip()
    return None, (text[:200] or "no details")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


async def generate_over_http(
    runtime, server: ServerClient, n: int, labels=None, *, seed: int = 0, sampler=None,
    server_sampler: str = "ddpm", server_steps: int | None = None, concurrency: int = 4, progress=None,
) -> np.ndarray:
    """``n`` images ``[n,C,H,W]`` in [-1, 1]: handoff samples from the server, finished on this device.

    The bundle is checked against the server first. More than the token's ``max_n`` images are
    fetched in chunks (seeds ``seed``, ``seed+1``, …), up to ``concurrency`` at a time, each finished
    as soon as it arrives. ``progress`` (a :class:`collafuse_edge.progress.Progress`) shows the wait
    on the server and the client's levels as they run.
    """
    import threading

    from .progress import QUIET
    from .runtime import _check_n
    from .sampler import SamplerConfig
    from .generate import client_steps

    progress = progress if progress is not None else QUIET
    sampler = sampler or SamplerConfig()
    _check_n(n)
    check_int("concurrency", concurrency, low=1)
    info = await server.check_bundle(runtime.bundle)
    lab = runtime.labels_for(n, labels)
    chunks = [(a, min(n, a + info.max_n)) for a in range(0, n, info.max_n)]
    if seed + len(chunks) - 1 > MAX_SEED:
        raise InputError(f"seed {seed} leaves no room for {len(chunks)} chunk seeds")
    gate = asyncio.Semaphore(concurrency)
    fetch = server.source(sampler=server_sampler, steps=server_steps)
    total_steps = client_steps(runtime.bundle, sampler) * len(chunks)
    lock = threading.Lock()
    state = {"received": 0, "steps": 0}
    server_what = f"{server_sampler}" + (f", {server_steps} steps" if server_sampler == "ddim" and server_steps else "")

    here = runtime.bundle.sampler_for(sampler)  # a distilled bundle runs its own timetable
    here_what = f"distilled, {here.steps} calls" if here.sampler == "distilled" else here.sampler
    with progress.ticker(f"{n} images: waiting on {server.config.url} ({server_what} there, "
                         f"{here_what} here)") as t:

        def show() -> None:
            t.set_detail(f"— server: {state['received']}/{len(chunks)} handoff batches received; "
                         f"this device: {state['steps']}/{total_steps} client steps")

        def on_step(i: int, level: int, x: np.ndarray) -> None:
            with lock:
                state["steps"] += 1
            show()

        async def src(k: int, labels: Optional[np.ndarray], s: int):
            h = await fetch(k, labels, s)
            with lock:
                state["received"] += 1
            show()
            return h

        async def one(i: int, a: int, b: int) -> np.ndarray:
            async with gate:
                return await runtime.agenerate(b - a, src, None if lab is None else lab[a:b], sampler=sampler,
                                               seed=seed + i, callback=on_step)

        show()
        parts = await asyncio.gather(*(one(i, a, b) for i, (a, b) in enumerate(chunks)))
    return np.concatenate(parts)
