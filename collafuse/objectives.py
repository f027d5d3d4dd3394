"""What a client discloses to the server, and the losses both sides train with (docs/architecture.md#the-method).

The client→server disclosure goes through :func:`disclose` only; it returns exactly what would
cross the network (a :class:`Disclosure`), so the in-process simulation and the networked mode
send the same thing.

Server objectives, for a server level t > h (h = k-1 is the client's handoff level):

* ``exact``: x_t = sqrt(ᾱ_t/ᾱ_h)·x_h + sqrt(1-ᾱ_t/ᾱ_h)·ε'. With ``s_t = sqrt((1-ᾱ_t)/(1-ᾱ_t/ᾱ_h))``
  the target ``s_t·ε'`` is unbiased for E[ε | x_t] (Tweedie: both equal -sqrt(1-ᾱ_t)·∇log p_t),
  so the minimiser is the ordinary DDPM minimiser. ``s_t`` explodes next to the handoff level
  (≈9 at the first server level of a 1000-step linear schedule): the default ``eps-prime``
  weighting divides the per-row loss by s_t², i.e. regresses ε̂/s_t on ε' whose variance is 1
  at every level. A per-level weight changes no per-level minimiser, so it stays unbiased.
* ``double-noise``: treats x_h as clean data (the authors' public code). Biased.
* ``shared-noise``: the client sends (x_t, ε, t); the server can recover x0 exactly. Reproduction only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from collafuse_edge.schedule import Schedule

from .errors import ConfigError, InputError

EpsFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

SHARED_NOISE_WARNING = (
    "objective 'shared-noise' sends (x_t, ε, t) to the server, which then recovers every client "
    "training image exactly as x0 = (x_t - sqrt(1-ᾱ_t)·ε)/sqrt(ᾱ_t). Use it only to reproduce the "
    "first CollaFuse paper, never with private data."
)


@dataclass(frozen=True)
class Disclosure:
    """Exactly what one client sends the server for one batch.

    ``x``: ``[B,C,H,W]`` float32 — x_h for ``exact``/``double-noise``; x_t for ``shared-noise``.
    ``level``: h = k-1 (-1 means the images themselves, c = 0).
    ``labels``: ``[B]`` int64 when labels are shared, else None.
    ``eps``, ``t``: only for ``shared-noise`` (the noise and per-row levels of x_t).
    """

    client: int
    level: int
    x: torch.Tensor
    labels: torch.Tensor | None = None
    eps: torch.Tensor | None = None
    t: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(int(v.numel() * v.element_size()) for v in (self.x, self.labels, self.eps, self.t) if v is not None)


def _uniform_levels(lo: torch.Tensor, hi: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row integer levels uniform in [lo_i, hi]."""
    u = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
    span = (hi - lo + 1).to(torch.float64)
    return (lo + torch.floor(u * span).long()).clamp(max=hi)


def _randn(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def disclose(
    client: int,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    k: int,
    schedule: Schedule,
    objective: str,
    gen: torch.Generator,
    share_labels: bool,
    noise: torch.Tensor | None = None,
) -> Disclosure | None:
    """What the client with k local levels sends for clean images ``x0`` ``[B,C,H,W]`` (CPU).

    Returns None when the client runs every level (k = T: nothing to disclose). One fresh noise
    draw per image from ``gen``, or ``noise`` when given (disclose-once: each image's keyed ε,
    :mod:`collafuse.privacy_once`).
    """
    T = schedule.T
    if k >= T:
        return None
    h = k - 1
    lab = labels.clone() if (share_labels and labels is not None) else None
    B = x0.shape[0]
    if objective == "shared-noise":
        warnings.warn(SHARED_NOISE_WARNING, stacklevel=2)
        t = _uniform_levels(torch.full((B,), k, dtype=torch.long), T - 1, gen)
        eps = _randn(x0.shape, gen)
        return Disclosure(client, h, schedule.add_noise(x0, eps, t), lab, eps, t)
    if objective not in ("exact", "double-noise"):
        raise ConfigError(f"unknown objective {objective!r}")
    if h < 0:
        return Disclosure(client, h, x0.clone(), lab)
    eps = _randn(x0.shape, gen) if noise is None else noise
    return Disclosure(client, h, schedule.add_noise(x0, eps, h), lab)


def client_loss(
    eps_fn: EpsFn, x0: torch.Tensor, labels: torch.Tensor | None, k: int, schedule: Schedule,
    gen: torch.Generator, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard DDPM ε-loss on the client's levels 0 … k-1 (needs k ≥ 1)."""
    B = x0.shape[0]
    t = _uniform_levels(torch.zeros(B, dtype=torch.long), k - 1, gen)
    eps = _randn(x0.shape, gen)
    x_t = schedule.add_noise(x0, eps, t)
    lab = labels.to(device) if labels is not None else None
    pred = eps_fn(x_t.to(device), t.to(device), lab)
    return torch.mean((pred.float() - eps.to(device)) ** 2)


def exact_scale(schedule: Schedule, t: np.ndarray, h: np.ndarray) -> np.ndarray:
    """s_t = sqrt((1-ᾱ_t)/(1-ᾱ_t/ᾱ_h)): the factor that makes s_t·ε' unbiased for E[ε|x_t]."""
    ab_t = schedule.alpha_bar(t)
    ab_h = schedule.alpha_bar(h)
    return np.sqrt((1 - ab_t) / (1 - ab_t / ab_h))


@dataclass(frozen=True)
class ServerBatch:
    """A server training batch built from disclosures (CPU tensors)."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor  # [B] per-row loss weight
    labels: torch.Tensor | None


def server_batch(
    disclosures: list[Disclosure],
    schedule: Schedule,
    objective: str,
    gen: torch.Generator,
    weighting: str = "eps-prime",
) -> ServerBatch | None:
    """Turn disclosures into (x_t, t, target, weight) for the server's levels, without x0."""
    ds = [d for d in disclosures if d is not None]
    if not ds:
        return None
    T = schedule.T
    x = torch.cat([d.x for d in ds])
    h = torch.cat([torch.full((d.x.shape[0],), d.level, dtype=torch.long) for d in ds])
    has_labels = [d.labels is not None for d in ds]
    if any(has_labels) and not all(has_labels):
        raise InputError("some disclosures carry labels and some do not")
    labels = torch.cat([d.labels for d in ds]) if all(has_labels) else None
    B = x.shape[0]
    if objective == "shared-noise":
        t = torch.cat([d.t for d in ds])
        eps = torch.cat([d.eps for d in ds])
        return ServerBatch(x, t, eps, torch.ones(B), labels)
    t = _uniform_levels(h + 1, T - 1, gen)
    eps = _randn(x.shape, gen)
    if objective == "double-noise":
        # treats x_h as if it were x0: noise it with the full marginal of level t
        return ServerBatch(schedule.add_noise(x, eps, t), t, eps, torch.ones(B), labels)
    if objective != "exact":
        raise ConfigError(f"unknown objective {objective!r}")
    x_t = schedule.renoise(x, eps, t, h)
    s = torch.from_numpy(exact_scale(schedule, t.numpy(), h.numpy())).float()
    target = eps * s.view(-1, 1, 1, 1)
    if weighting == "eps-prime":
        weight = 1.0 / s**2
    elif weighting == "eps":
        weight = torch.ones(B)
    else:
        raise ConfigError(f"unknown weighting {weighting!r}")
    return ServerBatch(x_t, t, target, weight, labels)


def server_loss(eps_fn: EpsFn, batch: ServerBatch, device: torch.device | str = "cpu") -> torch.Tensor:
    """Weighted ε-regression: mean_i w_i · mean((ε̂_i - target_i)²)."""
    lab = batch.labels.to(device) if batch.labels is not None else None
    pred = eps_fn(batch.x_t.to(device), batch.t.to(device), lab).float()
    per_row = ((pred - batch.target.to(device)) ** 2).flatten(1).mean(1)
    w = batch.weight.to(device)
    return (w * per_row).sum() / w.sum()
