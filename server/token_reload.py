"""Token rotation without a restart: ``SIGHUP``, or the config file changing on disk.

``collafuse serve --config FILE`` remembers FILE (``ServerConfig.config_file``). On ``SIGHUP``, and
when FILE's mtime/size/inode change (checked every ``token_reload_s`` seconds; 0 = SIGHUP only),
the server re-reads FILE's ``[[tokens]]``, validates the whole table against the run exactly as at
start-up, and only then swaps it in — one attribute assignment on the event loop, so a request
sees either the old table or the new one, never a mix. A file that does not validate changes
nothing (the error is logged, the old tokens stay in force). Tokens whose entry did not change
keep their rate-limit bucket and daily quota. Only tokens are reloaded; a changed ``[server]``
table is logged as a warning, because its options need a restart. Every successful reload logs
one INFO line, so after a failed one the log's last word is not the ERROR. Each reload counts in
``collafuse_token_reloads_total{result="ok"|"failed"}``. Under ``--workers N`` (gunicorn) each
worker polls the file itself (each worker logs its own lines; they carry its pid).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from typing import AsyncIterator

from aiohttp import web

from .auth import TokenStore
from .config import read_config_file, tokens_from
from .errors import ServerConfigError
from .state import STATE, ServerState

log = logging.getLogger("collafuse.server")

ENV_SERVER_TABLE = "COLLAFUSE_SERVER_TABLE_JSON"  # the [server] table at start (set by `collafuse serve --workers`)


def reload_tokens(state: ServerState, *, startup: bool = False) -> bool:
    """Re-read ``state.config.config_file``'s tokens and swap them in. True when the table changed.

    Every outcome is logged: a failure at ERROR (the old tokens stay in force), every successful
    reload at INFO (also when the tokens did not change, so the line after an ERROR says the file
    is good again), and a ``[server]`` table that differs from the one the server started with at
    WARNING (those options need a restart). ``startup``: the check a (re)started worker makes;
    it is quiet when nothing changed and is not counted in ``collafuse_token_reloads_total``."""
    cfg = state.config
    path = cfg.config_file
    if path is None:
        log.warning("token reload asked, but the server was started without --config FILE: nothing to reload")
        return False
    try:
        doc = read_config_file(path)
        tokens = tokens_from(doc.get("tokens"), path)
        new_cfg = dataclasses.replace(cfg, tokens=tokens)  # re-validates the table (digests, max_n, …)
        store = TokenStore.from_config(new_cfg, state.run_config.cut_ratios,
                                       state.run_config.schedule.num_train_timesteps, previous=state.tokens)
    except (ServerConfigError, OSError, ValueError, TypeError) as e:
        log.error("token reload from %s failed, the %d tokens in use stay in force: %s", path, len(state.tokens), e)
        state.metrics.token_reloads.labels("failed").inc()
        state.token_reload_failed = True
        return False
    _warn_server_changes(state, path, doc.get("server"))
    recovered, state.token_reload_failed = state.token_reload_failed, False
    if not startup:
        state.metrics.token_reloads.labels("ok").inc()
    if new_cfg.tokens == cfg.tokens:
        if startup and not recovered:
            log.debug("token reload from %s: unchanged", path)
        else:
            log.info("token reload from %s: ok, the %d tokens in force are unchanged (%s)%s", path, len(state.tokens),
                     ", ".join(state.tokens.names()), "; the earlier failure is resolved" if recovered else "")
        return False
    state.config, state.tokens = new_cfg, store  # the swap: requests see the old table or the new one
    log.info("reloaded %d tokens from %s (%s)%s", len(store), path, ", ".join(store.names()),
             "; the earlier failure is resolved" if recovered else "")
    return True


def _warn_server_changes(state: ServerState, path: str, table) -> None:
    """WARNING when the file's ``[server]`` table differs from the one the server started with."""
    started = state.server_table
    now = table if isinstance(table, dict) else {}
    if started is None or now == started:
        return
    changed = sorted(k for k in set(started) | set(now) if started.get(k, _MISSING) != now.get(k, _MISSING))
    log.warning("[server] changed in %s (%s): these options need a restart to apply; restart collafuse serve "
                "(only [[tokens]] are reloaded while it runs)", path, ", ".join(changed))


_MISSING = object()


def server_table_at_start(config_file: str | None) -> dict | None:
    """The ``[server]`` table the server started with: from the serving parent (``--workers N``, so a
    worker restarted after an edit still compares with the start), else read from the file now."""
    if config_file is None:
        return None
    raw = os.environ.get(ENV_SERVER_TABLE)
    if raw is not None:
        try:
            table = json.loads(raw)
            if isinstance(table, dict):
                return table
        except ValueError:
            pass
    try:
        table = read_config_file(config_file).get("server", {})
    except ServerConfigError:
        return None
    return table if isinstance(table, dict) else {}


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


async def _watch(state: ServerState, path: str, every: float) -> None:
    seen = _stamp(path)
    while True:
        await asyncio.sleep(every)
        now = _stamp(path)
        if now is not None and now != seen:
            seen = now
            reload_tokens(state)


async def token_reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: SIGHUP handler and the file watcher (installed before the model loads)."""
    state = app[STATE]
    path = state.config.config_file
    loop = asyncio.get_running_loop()
    hup = False
    if path is not None and hasattr(signal, "SIGHUP"):
        try:
            loop.add_signal_handler(signal.SIGHUP, reload_tokens, state)
            hup = True
        except (RuntimeError, NotImplementedError, ValueError):  # not the main thread / no signals here
            pass
        # a gunicorn worker (re)started after the file changed picks the change up here
        reload_tokens(state, startup=True)
    task = None
    if path is not None and state.config.token_reload_s > 0:
        task = asyncio.create_task(_watch(state, path, state.config.token_reload_s))
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)


__all__ = ["reload_tokens", "token_reload_ctx"]
