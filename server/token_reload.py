"""Token rotation without a restart: ``SIGHUP``, or the config file changing on disk.

``collafuse serve --config FILE`` remembers FILE (``ServerConfig.config_file``). On ``SIGHUP``, and
when FILE's mtime/size/inode change (checked every ``token_reload_s`` seconds; 0 = SIGHUP only),
the server re-reads FILE's ``[[tokens]]``, validates the whole table against the run exactly as at
start-up, and only then swaps it in — one attribute assignment on the event loop, so a request
sees either the old table or the new one, never a mix. A file that does not validate changes
nothing (the error is logged, the old tokens stay in force). Tokens whose entry did not change
keep their rate-limit bucket and daily quota. Only tokens are reloaded; ``[server]`` options need
a restart. Under ``--workers N`` (gunicorn) each worker polls the file itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from typing import AsyncIterator

from aiohttp import web

from .auth import TokenStore
from .config import load_tokens
from .errors import ServerConfigError
from .state import STATE, ServerState

log = logging.getLogger("collafuse.server")


def reload_tokens(state: ServerState) -> bool:
    """Re-read ``state.config.config_file``'s tokens and swap them in. True when the table changed."""
    cfg = state.config
    path = cfg.config_file
    if path is None:
        log.warning("token reload asked, but the server was started without --config FILE: nothing to reload")
        return False
    try:
        tokens = load_tokens(path)
        new_cfg = dataclasses.replace(cfg, tokens=tokens)  # re-validates the table (digests, max_n, …)
        store = TokenStore.from_config(new_cfg, state.run_config.cut_ratios,
                                       state.run_config.schedule.num_train_timesteps, previous=state.tokens)
    except (ServerConfigError, OSError, ValueError, TypeError) as e:
        log.error("token reload from %s failed, the %d tokens in use stay in force: %s", path, len(state.tokens), e)
        return False
    if new_cfg.tokens == cfg.tokens:
        log.debug("token reload from %s: unchanged", path)
        return False
    state.config, state.tokens = new_cfg, store  # the swap: requests see the old table or the new one
    log.info("reloaded %d tokens from %s (%s)", len(store), path, ", ".join(store.names()))
    return True


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
        reload_tokens(state)
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
