"""Sampling a trained run: per-client split sampling with the client's own labels, to PNG/.npy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import LoadedRun


@dataclass(frozen=True)
class SampleConfig:
    n: int = 16
    sampler: str = "ddim"  # "ddpm" (every level) or "ddim"
    server_steps: int | None = 40  # DDIM levels on the server side (None = every level)
    client_steps: int | None = 20  # DDIM levels on the client side (None = every level)
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if isinstance(self.n, bool) or not isinstance(self.n, int) or not (1 <= self.n <= 10_000):
            raise ConfigError(f"n must be an integer in [1, 10000], got {self.n!r}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ConfigError(f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        for name in ("server_steps", "client_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {v!r}")
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


def sample_client(run: LoadedRun, client: int, sc: SampleConfig, labels: np.ndarray | None = None,
                  progress: bool = False):
    """Split-sample ``sc.n`` images for one client: server levels, then the client's levels."""
    from .sampling import split_sample

    cfg = run.config
    if not (0 <= client < cfg.data.num_clients):
        raise ValueError(f"client must be in [0, {cfg.data.num_clients - 1}], got {client}")
    if labels is None and (cfg.class_conditional or cfg.server_conditioning == "label"):
        labels = client_labels(run, client, sc.n)
    k = cfg.client_levels[client]
    dev = next(run.server.parameters()).device
    return split_sample(
        run.server, run.clients[client], run.schedule, k, sc.n,
        shape=(run.data.channels, run.data.image_size, run.data.image_size),
        labels=labels if cfg.class_conditional else None,
        server_labels=labels if cfg.server_conditioning == "label" else None,
        sampler=sc.sampler, server_steps=sc.server_steps, client_steps=sc.client_steps,
        eta=sc.eta, seed=sc.seed, device=dev, progress=progress,
    )


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()
