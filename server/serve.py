"""Running the app: one process (aiohttp's runner) or several (gunicorn's aiohttp worker).

The handoff endpoint is stateless given the weights (docs/architecture.md), so scaling out is plain process
replication: every worker loads the model, runs its own batching engine and answers on the same
port (gunicorn hands connections to workers); replicas on several machines go behind any HTTP
load balancer. Rate limits and quotas are kept per process.

Gunicorn directly (what ``collafuse serve --workers N`` does)::

    COLLAFUSE_RUN=runs/demo COLLAFUSE_SERVER_CONFIG=server.toml \\
    gunicorn 'collafuse.server.serve:app_factory' --worker-class aiohttp.GunicornWebWorker \\
        --workers 4 --bind 0.0.0.0:8080 --graceful-timeout 35 --timeout 300
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import ssl

from .config import ServerConfig, TokenEntry, load_server_config
from .errors import ServerConfigError

log = logging.getLogger("collafuse.server")

ENV_CONFIG_JSON = "COLLAFUSE_SERVER_CONFIG_JSON"  # a whole ServerConfig (set by `collafuse serve --workers`)
ENV_RUN = "COLLAFUSE_RUN"  # or: the run directory …
ENV_CONFIG_FILE = "COLLAFUSE_SERVER_CONFIG"  # … and an optional config file


def config_to_json(cfg: ServerConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def config_from_json(text: str) -> ServerConfig:
    d = json.loads(text)
    d["tokens"] = tuple(TokenEntry(**t) for t in d.get("tokens", ()))
    return ServerConfig(**d)


def ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ServerConfigError(f"cannot load TLS certificate {cfg.tls_cert!r} / key {cfg.tls_key!r}: {e}") from e
    return ctx


def serve(cfg: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and exit."""
    if cfg.workers > 1:
        serve_gunicorn(cfg)
        return
    from aiohttp import web

    from collafuse.run_lock import RunLock

    from .app import create_app

    # The port first, then the run's lock, then the model: a second instance on a taken port, or a
    # second trainer on a run, is refused before it loads anything or touches the run.
    sock = bind_socket(cfg.host, cfg.port)
    lock = RunLock(cfg.run_dir, "collafuse serve --train") if cfg.train else None
    try:
        if lock is not None:
            lock.acquire()
        app = create_app(cfg)  # fails fast on a bad run or token table
        scheme = "https" if cfg.tls else "http"
        port = sock.getsockname()[1]
        # handler_cancellation: a client that hangs up cancels its handler, and the engine drops the job
        # at the next step instead of computing samples nobody will read.
        web.run_app(app, sock=sock, ssl_context=ssl_context(cfg),
                    shutdown_timeout=cfg.drain_timeout_s + 5, handler_cancellation=True,
                    keepalive_timeout=cfg.keepalive_timeout_s,
                    print=lambda *_: print(f"collafuse serve: listening on {scheme}://{cfg.host}:{port} "
                                           f"(Ctrl-C to stop)", flush=True))
    finally:
        if lock is not None:
            lock.release()
        sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a one-line error when the port is taken."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServerConfigError(f"port {port} on {host} is already in use (another collafuse serve?); stop "
                                    "that process or choose another --port") from None
        raise ServerConfigError(f"cannot listen on {host}:{port}: {e}") from None
    sock.set_inheritable(False)
    return sock


async def app_factory():
    """For gunicorn's aiohttp worker: the app of the config in the environment (see module doc)."""
    from .app import create_app

    if ENV_CONFIG_JSON in os.environ:
        cfg = config_from_json(os.environ[ENV_CONFIG_JSON])
    elif ENV_RUN in os.environ:
        cfg = load_server_config(os.environ[ENV_RUN], os.environ.get(ENV_CONFIG_FILE))
    else:
        raise ServerConfigError(f"set {ENV_RUN}=RUN_DIR (and optionally {ENV_CONFIG_FILE}=FILE) for the workers")
    if cfg.threads == 0 and cfg.workers > 1:
        # N processes on C cores: give each its share instead of letting each grab them all.
        cfg = dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // cfg.workers))
    from aiohttp import web

    # A runner rather than the app, to get handler cancellation as in the single-process server.
    return web.AppRunner(create_app(cfg), handler_cancellation=True, shutdown_timeout=cfg.drain_timeout_s + 5,
                         keepalive_timeout=cfg.keepalive_timeout_s, access_log=logging.getLogger("aiohttp.access"))


def serve_gunicorn(cfg: ServerConfig) -> None:
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError as e:
        raise ServerConfigError(f"--workers {cfg.workers} runs gunicorn's aiohttp worker, and gunicorn is not "
                                "installed: pip install gunicorn (or serve with --workers 1)") from e

    # Validate the run and the token table once in the parent, so a bad config fails before forking.
    from collafuse.checkpoint import read_config

    from .auth import TokenStore

    rc = read_config(cfg.run_dir)
    TokenStore.from_config(cfg, rc.cut_ratios, rc.schedule.num_train_timesteps)
    os.environ[ENV_CONFIG_JSON] = config_to_json(cfg)

    class CollafuseGunicorn(BaseApplication):
        def load_config(self):
            s = self.cfg.set
            s("bind", f"{cfg.host}:{cfg.port}")
            s("workers", cfg.workers)
            s("worker_class", "aiohttp.GunicornWebWorker")
            s("graceful_timeout", int(cfg.drain_timeout_s) + 5)
            s("timeout", 300)  # model load + warm-up happen before a worker's first heartbeat
            if "control_socket_disable" in self.cfg.settings:  # gunicorn ≥ 24: one fixed path per user
                s("control_socket_disable", True)
            if cfg.tls:
                s("certfile", cfg.tls_cert)
                s("keyfile", cfg.tls_key)

        def load(self):
            return app_factory

    print(f"collafuse serve: {cfg.workers} gunicorn workers on {'https' if cfg.tls else 'http'}://"
          f"{cfg.host}:{cfg.port}", flush=True)
    CollafuseGunicorn().run()
