"""What every part of the server shares: :class:`ServerState` and the app's typed keys.

A leaf module: it imports no other server module at run time, so the app, the routes, the
middleware and the token reloader all import their keys from here at the top and none of them
imports another to find the state.

The app holds one key, :data:`STATE`. Everything that changes after start-up (the engine once
the model is loaded, the trainer once it runs, the token table on reload) is an attribute of the
state, set on the event loop: an aiohttp application's own items are fixed once it starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # types only: importing these at run time would load torch for a type hint
    from collafuse.checkpoint import DataInfo, LoadedRun
    from collafuse.config import RunConfig
    from collafuse.server_training import ServerTrainer

    from .auth import Grant, TokenStore
    from .config import ServerConfig
    from .engine import StepEngine
    from .prometheus import ServerMetrics


@dataclass
class ServerState:
    """What the views need. ``engine`` and ``model_version`` are set once the model is loaded;
    ``trainer`` while the server trains from client uploads (``ServerConfig.train``), else None."""

    config: ServerConfig
    run_config: RunConfig
    data: DataInfo
    tokens: TokenStore
    metrics: ServerMetrics
    engine: StepEngine | None = None
    model_version: str = ""
    step: int = 0
    accel: str = ""
    device: str = ""
    draining: bool = False
    schedule_doc: dict = field(default_factory=dict, repr=False)  # /v1/info's schedule, built once
    preloaded: LoadedRun | None = field(default=None, repr=False)
    trainer: ServerTrainer | None = field(default=None, repr=False)
    server_table: dict | None = field(default=None, repr=False)  # the config file's [server] at start
    token_reload_failed: bool = False  # the last token reload failed (the next good one says so)

    def set_model_version(self, version: str, step: int) -> None:
        """The served weights changed (on the event loop): /v1/info, headers and collafuse_model_info."""
        self.model_version, self.step = version, step
        self.metrics.set_model_version(version)

    def training_progress(self) -> dict:
        return {"enabled": True, **self.trainer.progress()} if self.trainer is not None else {"enabled": False}

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.accepting and not self.draining

    @property
    def conditional(self) -> bool:
        return self.run_config.server_conditioning == "label"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.data.channels, self.data.image_size, self.data.image_size)


STATE = web.AppKey("collafuse_state", ServerState)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE]


def require_grant(request: web.Request) -> Grant:
    """Authenticate the bearer token (401/403); every /v1/ view starts here."""
    return state_of(request).tokens.authenticate(request.headers.get("Authorization"))


__all__ = ["STATE", "ServerState", "require_grant", "state_of"]
