"""The server's levels over HTTP for the torch side: ``collafuse sample --server URL`` and
``collafuse evaluate --server URL``, above all on a site's own run (``collafuse client-train``
output), which holds the site's client model and no server model.

The split is the one the edge runtime runs (:func:`collafuse_edge.http_client.generate_over_http`):
``n`` images are fetched in chunks of at most the token's ``max_n``, chunk ``i`` with seed
``seed + i``; each chunk's handoff sample is finished by the site's torch model with the same seed,
so a torch site and an edge device produce the same images from the same server for the same seed.
"""
from __future__ import annotations

import asyncio

import numpy as np
import torch

from collafuse_edge.http_client import ClientConfig, ServerClient, ServerInfo
from collafuse_edge.schedule import client_timetable

from .errors import ConfigError, InputError


class RemoteServer:
    """A synchronous handle on one collafuse server (one token: one client). Use as ``with``."""

    def __init__(self, url: str, token: str | None = None, *, ca_file: str | None = None, retries: int = 8,
                 max_backoff_s: float = 10.0):
        self.config = ClientConfig(url, token=token, ca_file=ca_file, retries=retries, max_backoff_s=max_backoff_s)
        self._loop = asyncio.new_event_loop()
        self._client = ServerClient(self.config)
        try:
            self.info: ServerInfo = self._run(self._client.info())
        except BaseException:
            self.close()
            raise

    def _run(self, coro):
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def model_version(self) -> str:
        return self.info.model_version

    def check_run(self, run, client: int) -> None:
        """Refuse a run whose schedule, image shape or handoff level differ from this token's on the
        server: the images would be garbage, silently."""
        info, cfg = self.info, run.config
        url = self.config.url
        if info.schedule.to_dict() != run.schedule.to_dict():
            raise ConfigError(f"the server at {url} uses schedule {info.schedule.to_dict()}, the run "
                              f"{run.run_dir!r} {run.schedule.to_dict()}: this run was not trained for that server")
        shape = (run.data.channels, run.data.image_size, run.data.image_size)
        if tuple(info.image_shape) != shape:
            raise ConfigError(f"the server at {url} generates {tuple(info.image_shape)} images, the run "
                              f"{run.run_dir!r} {shape}")
        k = cfg.client_levels[client]
        if info.client_levels != k:
            raise ConfigError(f"this token is the server's client {info.client} with {info.client_levels} client "
                              f"levels (handoff level {info.handoff_level}); client {client} of {run.run_dir!r} "
                              f"runs {k}: use that client's token, or pick the matching --client")

    def handoff(self, n: int, labels: np.ndarray | None, seed: int, *, sampler: str, steps: int | None,
                eta: float = 0.0) -> np.ndarray:
        """``n`` ≤ ``info.max_n`` handoff samples ``[n,C,H,W]`` at this token's handoff level."""
        got = self._run(self._client.handoff(n, labels, seed, sampler=sampler,
                                             steps=steps if sampler == "ddim" else None,
                                             eta=eta if sampler == "ddim" else 0.0))
        return got.samples


@torch.no_grad()
def remote_split_sample(remote: RemoteServer, client_model: torch.nn.Module, schedule, k: int, n: int, *,
                        labels=None, server_labels=None, sampler: str = "ddim", server_steps: int | None = None,
                        client_steps: int | None = None, eta: float = 0.0, seed: int = 0, progress: bool = False):
    """Split sampling with the server's levels over HTTP and the client's in torch (a
    :class:`collafuse.sampling.SplitSample`); chunks of ``info.max_n`` use seeds ``seed``, ``seed+1``, …
    ``labels`` condition the client model, ``server_labels`` are sent when the server needs them."""
    from .sampling import SplitSample, run_levels

    if remote.info.client_levels != k:
        raise InputError(f"the server's token runs {remote.info.client_levels} client levels, the model {k}")
    lab, slab = (None if v is None else np.asarray(v, dtype=np.int64).reshape(-1) for v in (labels, server_labels))
    for name, v in (("labels", lab), ("server_labels", slab)):
        if v is not None and len(v) != n:
            raise InputError(f"{name} must have length {n}, got {len(v)}")
    if remote.info.labels_required and slab is None:
        raise InputError(f"the server at {remote.config.url} conditions on class labels: pass server_labels")
    dev = next(client_model.parameters()).device
    step = remote.info.max_n
    handoffs, images = [], []
    for i, a in enumerate(range(0, n, step)):
        b = min(n, a + step)
        x = torch.from_numpy(remote.handoff(b - a, None if slab is None else slab[a:b], seed + i,
                                            sampler=sampler, steps=server_steps, eta=eta)).to(dev)
        handoffs.append(x.clone())
        images.append(run_levels(client_model, schedule, x, client_timetable(k, client_steps),
                                 None if lab is None else lab[a:b],
                                 sampler=sampler, eta=eta, seed=seed + i, progress=progress, desc="client"))
    return SplitSample(handoff=torch.cat(handoffs), images=torch.cat(images), handoff_level=k - 1)
