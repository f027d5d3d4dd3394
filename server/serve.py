"""Running the app: one process (aiohttp's runner) or several (gunicorn's aiohttp worker).

The handoff endpoint is stateless given the weights (docs/architecture.md), so scaling out is plain process
replication: every worker loads the model, runs its own batching engine and answers on the same
port (gunicorn hands connections to workers); replicas on several machines go behind any HTTP
load balancer. Rate limits and quotas are kept per process.

Gunicorn directly (what ``collafuse serve --workers N`` does, less its checks before forking and
its metrics folder: give the workers an empty PROMETHEUS_MULTIPROC_DIR of their own for one
``/metrics`` view, see docs/monitoring.md)::

    COLLAFUSE_RUN=runs/demo COLLAFUSE_SERVER_CONFIG=server.toml PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) \\
    gunicorn 'collafuse.server.serve:app_factory' --worker-class aiohttp.GunicornWebWorker \\
        --workers 4 --bind 0.0.0.0:8080 --graceful-timeout 35 --timeout 300
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import ssl
import tempfile

from .config import ServerConfig, TokenEntry, load_server_config
from .errors import ServerConfigError

log = logging.getLogger("collafuse.server")

ENV_CONFIG_JSON = "COLLAFUSE_SERVER_CONFIG_JSON"  # a whole ServerConfig (set by `collafuse serve --workers`)
ENV_RUN = "COLLAFUSE_RUN"  # or: the run directory …
ENV_CONFIG_FILE = "COLLAFUSE_SERVER_CONFIG"  # … and an optional config file
# prometheus_client's multiprocess folder (= prometheus.MULTIPROC_ENV; not imported here, so that
# prometheus_client is first imported once the variable is set)
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


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
    """Serve until SIGINT/SIGTERM, then drain in-flight requests and exit.

    Everything an operator can get wrong fails first, as one line, before the model loads: the
    TLS certificate/key, the run directory and token table, the port (already in use), and with
    ``--train`` the run's lock (another trainer holds it)."""
    if cfg.workers > 1:
        serve_gunicorn(cfg)
        return
    from aiohttp import web

    from collafuse.run_lock import RunLock

    from .app import create_app

    tls = ssl_context(cfg)
    app = create_app(cfg)  # reads the run and checks the token table; the model loads once the app starts
    # The port, then the run's lock: a second instance on a taken port, or a second trainer on a
    # run, is refused before it loads the model or touches the run.
    sock = bind_socket(cfg.host, cfg.port)
    lock = RunLock(cfg.run_dir, "collafuse serve --train") if cfg.train else None
    try:
        if lock is not None:
            lock.acquire()
        scheme = "https" if cfg.tls else "http"
        port = sock.getsockname()[1]
        # handler_cancellation: a client that hangs up cancels its handler, and the engine drops the job
        # at the next step instead of computing samples nobody will read.
        web.run_app(app, sock=sock, ssl_context=tls,
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
    """``--workers N``: gunicorn's aiohttp worker, with one metrics view across the workers.

    The parent checks everything first (TLS files, run, tokens, the port), binds the port itself
    and hands gunicorn the socket (``fd://``), so a taken port is one line, not gunicorn's retries.
    It creates a private folder for prometheus_client's multiprocess mode (``GET /metrics`` on any
    worker merges every worker's numbers), marks a worker's live gauges dead when it exits, and
    deletes the folder when gunicorn stops."""
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError as e:
        raise ServerConfigError(f"--workers {cfg.workers} runs gunicorn's aiohttp worker, and gunicorn is not "
                                "installed: pip install gunicorn (or serve with --workers 1)") from e

    # Validate the run and the token table once in the parent, so a bad config fails before forking.
    from collafuse.checkpoint import read_config

    from .auth import TokenStore
    from .token_reload import ENV_SERVER_TABLE, server_table_at_start

    ssl_context(cfg)  # an unreadable certificate or key: one line here, not a traceback per worker
    rc = read_config(cfg.run_dir)
    TokenStore.from_config(cfg, rc.cut_ratios, rc.schedule.num_train_timesteps)
    sock = bind_socket(cfg.host, cfg.port)
    sock.set_inheritable(True)
    parent = os.getpid()
    metrics_dir = tempfile.mkdtemp(prefix="collafuse-metrics-")
    os.environ[ENV_CONFIG_JSON] = config_to_json(cfg)
    os.environ[ENV_METRICS_DIR] = metrics_dir
    table = server_table_at_start(cfg.config_file)
    if table is not None:
        os.environ[ENV_SERVER_TABLE] = json.dumps(table)
    fd = sock.detach()  # gunicorn owns the listening socket from here

    def child_exit(server, worker) -> None:  # in the gunicorn master, after a worker exited
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, metrics_dir)

    class CollafuseGunicorn(BaseApplication):
        def load_config(self):
            s = self.cfg.set
            s("bind", f"fd://{fd}")
            s("workers", cfg.workers)
            s("worker_class", "aiohttp.GunicornWebWorker")
            s("graceful_timeout", int(cfg.drain_timeout_s) + 5)
            s("timeout", 300)  # model load + warm-up happen before a worker's first heartbeat
            s("child_exit", child_exit)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn ≥ 24: one fixed path per user
                s("control_socket_disable", True)
            if cfg.tls:
                s("certfile", cfg.tls_cert)
                s("keyfile", cfg.tls_key)

        def load(self):
            return app_factory

    print(f"collafuse serve: {cfg.workers} gunicorn workers on {'https' if cfg.tls else 'http'}://"
          f"{cfg.host}:{cfg.port}", flush=True)
    try:
        CollafuseGunicorn().run()
    finally:
        if os.getpid() == parent:  # a forked worker unwinds through here too: only the parent cleans up
            shutil.rmtree(metrics_dir, ignore_errors=True)
