"""The aiohttp application: ``create_app(config) -> web.Application``.

State lives under typed :class:`web.AppKey` keys. The model and the batching engine open in a
cleanup context (loaded in a thread, warmed up, then ``/readyz`` turns ready) and close there;
on shutdown the app first drains: ``/readyz`` answers 503, new handoffs are refused with 503,
and in-flight handoffs finish (up to ``drain_timeout_s``) before the engine stops.

The state and its key live in :mod:`.state`; every route is registered in :mod:`.routes`.

Example::

    app = create_app(ServerConfig("runs/demo", tokens=(TokenEntry(hash_token(tok), client=0),)))
    web.run_app(app, host="127.0.0.1", port=8080)
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import AsyncIterator

from aiohttp import web

from collafuse.checkpoint import LoadedRun, load_tensors, read_config, read_data_info, server_checkpoint
from collafuse.checkpoint import model_version as checkpoint_model_version
from collafuse.errors import CheckpointError

from .auth import TokenStore
from .config import ServerConfig
from .engine import StepEngine
from .errors import ServerConfigError
from .middleware import error_middleware, quiet_malformed_http_logs
from .prometheus import ServerMetrics
from .routes import setup_routes
from .state import STATE, ServerState
from .token_reload import server_table_at_start, token_reload_ctx

log = logging.getLogger("collafuse.server")


def model_version(run_dir: str, which: str = "latest") -> tuple[str, int]:
    """``"<run name>@<step>:<sha256[:12] of the server weights>"`` of the server checkpoint ``which``
    (latest | run | a folder) and its step; identical in every process that serves the same
    weights, so clients can tell replicas apart when they differ."""
    try:
        return checkpoint_model_version(run_dir, server_checkpoint(run_dir, which))
    except CheckpointError as e:
        raise ServerConfigError(str(e)) from None


def _load_engine(state: ServerState) -> StepEngine:
    """Blocking: load the run's server model and build the engine (runs in a thread)."""
    import torch

    from collafuse.checkpoint import load_run

    from .denoiser import AccelConfig, TorchDenoiser, resolve_device

    cfg = state.config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    run = state.preloaded if state.preloaded is not None else load_run(cfg.run_dir, device="cpu", server_weights=cfg.server_checkpoint)
    den = TorchDenoiser(run.server, device, AccelConfig(cfg.precision, cfg.compile, cfg.cuda_graphs),
                        cfg.max_batch_rows)
    state.accel = den.accel.describe()
    state.device = str(device)
    return StepEngine(den, run.schedule, state.sample_shape, device, conditional=den.conditional,
                      batching=cfg.batching, max_batch_rows=cfg.max_batch_rows, max_queue=cfg.max_queue,
                      metrics=state.metrics)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, _load_engine, state)
    await engine.start()
    if state.config.warmup:
        await engine.run_sync(engine.denoise.warmup)
    state.engine = engine
    log.info("serving %s on %s (%s, batching %s, max %d rows per forward)", state.model_version, state.device,
             state.accel, "on" if state.config.batching else "off", state.config.max_batch_rows)
    try:
        yield
    finally:
        await engine.close()
        state.engine = None


async def _drain(app: web.Application) -> None:
    state = app[STATE]
    state.draining = True
    if state.engine is not None:
        busy = state.engine.active + state.engine.waiting
        if busy:
            log.info("draining %d in-flight handoff requests", busy)
        await state.engine.drain(state.config.drain_timeout_s)


def _publish_weights(app: web.Application, loop: asyncio.AbstractEventLoop, sd: dict, version: int) -> None:
    """Trainer thread → swap the served weights between engine steps (in the engine's worker
    thread, so no forward sees half-loaded weights); in-flight requests are not dropped."""
    state = app[STATE]
    engine = state.engine
    if engine is None:
        return
    model = engine.denoise.model

    def load() -> None:
        model.load_state_dict(sd)  # copies in place: compiled graphs / CUDA graphs stay valid

    async def swap() -> None:
        await engine.run_sync(load)
        state.set_model_version(name, step)
        log.info("serving new server weights %s", state.model_version)

    state.metrics.checkpoint_written()  # on_weights follows every durable trainer checkpoint
    name, step = model_version(state.config.run_dir)  # the checkpoint that holds these weights
    asyncio.run_coroutine_threadsafe(swap(), loop).result()


async def _weights_watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serving without ``--train`` (e.g. N gunicorn workers beside one training process): poll the
    run for a newer server checkpoint and swap it in between engine steps, dropping no request."""
    state = app[STATE]
    cfg = state.config
    if cfg.train or cfg.server_checkpoint != "latest" or not cfg.weights_poll_s:
        yield
        return
    loop = asyncio.get_running_loop()

    def newer() -> tuple[str, int, dict] | None:
        ckpt = server_checkpoint(cfg.run_dir, "latest")
        version, step = checkpoint_model_version(cfg.run_dir, ckpt)
        if version == state.model_version:
            return None
        sd = load_tensors(os.path.join(ckpt, "server.raw.safetensors"))
        sd.update(load_tensors(os.path.join(ckpt, "server.safetensors")))  # EMA over the raw weights
        return version, step, sd

    async def watch() -> None:
        while True:
            await asyncio.sleep(cfg.weights_poll_s)
            if state.engine is None:
                continue
            try:
                found = await loop.run_in_executor(None, newer)
                if found is not None:
                    version, step, sd = found
                    model = state.engine.denoise.model
                    await state.engine.run_sync(lambda: model.load_state_dict(sd))
                    state.set_model_version(version, step)
                    log.info("serving new server weights %s", version)
            except (CheckpointError, OSError, RuntimeError, ValueError) as e:  # a checkpoint being replaced
                log.warning("new server weights not loaded yet (%s); still serving %s", e, state.model_version)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def _checkpoint_time(state_dir: str) -> float | None:
    """When the newest checkpoint in ``state_dir`` was written (None: none yet)."""
    from collafuse.checkpoint import latest_checkpoint

    try:
        ckpt = latest_checkpoint(state_dir)
        return None if ckpt is None else os.path.getmtime(os.path.join(ckpt, "state.json"))
    except (CheckpointError, OSError):
        return None


async def _trainer_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    if not state.config.train:
        yield
        return
    from collafuse.server_training import ServerTrainer, ServerTrainingConfig

    cfg = state.config
    loop = asyncio.get_running_loop()
    tc = ServerTrainingConfig(batch_rows=cfg.train_batch_rows, checkpoint_every=cfg.train_checkpoint_every,
                              max_pending_batches=cfg.max_pending_batches, device=cfg.device)
    trainer = await loop.run_in_executor(
        None, lambda: ServerTrainer(cfg.run_dir, tc, on_weights=lambda sd, v: _publish_weights(app, loop, sd, v)))
    if trainer.step > 0:  # resumed: serve what the trainer had last published
        sd = trainer.ema_state_dict()
        await loop.run_in_executor(None, _publish_weights, app, loop, sd, trainer.step)
    state.metrics.watch_trainer(trainer, _checkpoint_time(trainer.state_dir))
    state.trainer = trainer
    trainer.start()
    log.info("training the server model from client uploads (step %d, %d batches pending)", trainer.step,
             len(trainer.spool))
    try:
        yield
    finally:
        await loop.run_in_executor(None, trainer.stop)
        state.trainer = None


def create_app(config: ServerConfig, *, run: LoadedRun | None = None) -> web.Application:
    """The server app for ``config``. ``run`` reuses an already loaded run (tests, notebooks).

    Raises ServerConfigError at once for a bad run directory or token table, before any port opens.
    """
    quiet_malformed_http_logs()

    run_config = read_config(config.run_dir) if run is None else run.config
    data = read_data_info(config.run_dir) if run is None else run.data
    tokens = TokenStore.from_config(config, run_config.cut_ratios, run_config.schedule.num_train_timesteps)
    version, step = model_version(config.run_dir, config.server_checkpoint)
    state = ServerState(config, run_config, data, tokens, ServerMetrics(training=config.train),
                        model_version=version, step=step, schedule_doc=run_config.schedule.build().to_dict(),
                        preloaded=run)
    state.metrics.set_model_version(version)
    state.server_table = server_table_at_start(config.config_file)
    body_limit = max(config.max_body_bytes, config.max_train_body_bytes if config.train else 0)
    app = web.Application(client_max_size=body_limit, middlewares=[error_middleware])
    app[STATE] = state
    app.cleanup_ctx.append(token_reload_ctx)  # first: SIGHUP must not kill a server still loading
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_trainer_ctx)
    app.cleanup_ctx.append(_weights_watch_ctx)
    app.on_shutdown.append(_drain)
    setup_routes(app)
    return app
