"""Generating with a trained run: :class:`SampleConfig` and the per-client entry point
:func:`sample_client` (the client's own labels, its cut ratio, its model). The sampler loop
itself — timetables, steps, keyed noise — is :mod:`collafuse.sampling`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collafuse_edge.validation import check_choice, check_int

from .checkpoint import LoadedRun
from .errors import ConfigError, InputError


@dataclass(frozen=True)
class SampleConfig:
    n: int = 16
    sampler: str = "ddim"  # "ddpm" (every level) or "ddim"
    server_steps: int | None = 40  # DDIM levels on the server side (None = every level)
    client_steps: int | None = 20  # DDIM levels on the client side (None = every level)
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("n", self.n, low=1, high=10_000, error=ConfigError)
        check_choice("sampler", self.sampler, ("ddpm", "ddim"), error=ConfigError)
        for name in ("server_steps", "client_steps"):
            check_int(f"{name} (None: every level)", getattr(self, name), low=1, allow_none=True, error=ConfigError)
        if self.eta < 0:
            raise ConfigError(f"eta must be ≥ 0, got {self.eta}")
        if self.sampler == "ddpm" and (self.server_steps or self.client_steps):
            object.__setattr__(self, "server_steps", None)
            object.__setattr__(self, "client_steps", None)


def client_labels(run: LoadedRun, client: int, n: int) -> np.ndarray:
    """Labels cycling through the classes client ``client`` holds (its private split)."""
    from .data import load_dataset, partition

    cfg = run.config
    ds = load_dataset(cfg.data.source, cfg.data.image_size)
    classes = partition(ds, cfg.data)[client].classes
    return np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)


def require_server(run: LoadedRun, remote) -> None:
    """Refuse to sample a site's run (it holds no server model) without a remote server."""
    if run.server is None and not remote:
        raise ConfigError(f"{run.run_dir!r} is a site's run: its server model lives on the server at "
                          f"{(run.site or {}).get('server', 'the server')}; pass --server URL (and its token)")


def sample_client(run: LoadedRun, client: int, sc: SampleConfig, labels: np.ndarray | None = None,
                  progress: bool = False, remote=None):
    """Split-sample ``sc.n`` images for one client: server levels, then the client's levels.

    ``remote`` (a :class:`collafuse.remote.RemoteServer`) runs the server's levels over HTTP
    instead of the run's own server model; a site's run (no server model) needs it."""
    from .sampling import split_sample

    cfg = run.config
    if not (0 <= client < cfg.data.num_clients) or run.clients[client] is None:
        have = [i for i, m in enumerate(run.clients) if m is not None]
        raise InputError(f"run {run.run_dir!r} holds the model of client {', '.join(map(str, have))}, not {client}")
    if labels is None and (cfg.class_conditional or cfg.server_conditioning == "label"):
        labels = client_labels(run, client, sc.n)
    k = cfg.client_levels[client]
    client_labels_ = labels if cfg.class_conditional else None
    server_labels = labels if cfg.server_conditioning == "label" else None
    if remote is not None:
        from .remote import remote_split_sample

        remote.check_run(run, client)
        return remote_split_sample(
            remote, run.clients[client], run.schedule, k, sc.n, labels=client_labels_, server_labels=server_labels,
            sampler=sc.sampler, server_steps=sc.server_steps, client_steps=sc.client_steps, eta=sc.eta,
            seed=sc.seed, progress=progress)
    require_server(run, remote)
    dev = next(run.server.parameters()).device
    return split_sample(
        run.server, run.clients[client], run.schedule, k, sc.n,
        shape=(run.data.channels, run.data.image_size, run.data.image_size),
        labels=client_labels_, server_labels=server_labels,
        sampler=sc.sampler, server_steps=sc.server_steps, client_steps=sc.client_steps,
        eta=sc.eta, seed=sc.seed, device=dev, progress=progress,
    )


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()
