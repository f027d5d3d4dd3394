"""Split sampling in torch: the server's levels T-1 … k, then the client's k-1 … 0 (docs/architecture.md#the-method).

The loop is written out plainly (timetable → model → step) and reuses the numpy schedule maths
of :mod:`collafuse_edge.schedule` and the keyed noise of :mod:`collafuse_edge.noise`, so the
torch sampler, the server and the edge runtime produce the same tensors for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from collafuse_edge.noise import StepNoiseAhead, initial_noise
from collafuse_edge.schedule import (
    Schedule,
    Timetable,
    client_timetable,
    needs_noise,
    server_timetable,
    step,
)

from .models import denoise
from .errors import InputError


def _labels(labels, n: int, device) -> torch.Tensor | None:
    if labels is None:
        return None
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    if lab.shape != (n,):
        raise InputError(f"labels must have shape [{n}], got {tuple(lab.shape)}")
    return lab


@torch.no_grad()
def run_levels(
    model: torch.nn.Module | None,
    schedule: Schedule,
    x: torch.Tensor,
    timetable: Timetable,
    labels=None,
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    desc: str = "denoise",
) -> torch.Tensor:
    """Run ``model`` over ``timetable`` starting from ``x`` ``[B,C,H,W]`` (the sample at
    ``timetable.levels[0]``); returns the sample at ``timetable.end``.

    The step noise at level t is ``collafuse_edge.noise.step_noise(seed, t, x.shape)``.
    """
    if len(timetable) == 0:
        return x
    if model is None:
        raise InputError("a model is needed to run a non-empty timetable")
    B = x.shape[0]
    lab = _labels(labels, B, x.device)
    it = timetable.pairs()
    noise_for = StepNoiseAhead(seed, tuple(x.shape), [t for t, _ in it if needs_noise(sampler, t, eta)])
    for t, prev in tqdm(it, desc=desc, disable=not progress, leave=False):
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        eps = denoise(model, x, tt, lab).to(x.dtype)
        noise = None
        if needs_noise(sampler, t, eta):
            noise = torch.from_numpy(noise_for(t)).to(x.device, x.dtype)
        x = step(sampler, schedule, x, eps, t, prev, noise, eta)
    return x


def run_distilled(model: torch.nn.Module, schedule: Schedule, x: torch.Tensor, timetable: Timetable, labels=None,
                  *, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """A distilled student's sampler (``SamplerConfig("distilled", N)`` on the edge): deterministic
    DDIM steps over ``timetable`` with x̂0 left unclipped between steps — the student was trained to
    land on its teacher's samples through the unclipped step — and the final image clipped to the
    schedule's range."""
    import dataclasses

    free = dataclasses.replace(schedule, clip_sample=False)
    x = run_levels(model, free, x, timetable, labels, sampler="ddim", eta=0.0, seed=seed, progress=progress,
                   desc="client (distilled)")
    if schedule.clip_sample:
        x = x.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x


@dataclass(frozen=True)
class SplitSample:
    handoff: torch.Tensor  # [B,C,H,W], the sample at level k-1 (what the server sends)
    images: torch.Tensor  # [B,C,H,W], the client's final images in [-1, 1]
    handoff_level: int


@torch.no_grad()
def split_sample(
    server_model: torch.nn.Module | None,
    client_model: torch.nn.Module | None,
    schedule: Schedule,
    k: int,
    n: int,
    *,
    shape: tuple[int, int, int],
    labels=None,
    server_labels=None,
    sampler: str = "ddpm",
    server_steps: int | None = None,
    client_steps: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> SplitSample:
    """Sample ``n`` images: server levels T-1 … k from x_{T-1} = initial_noise(seed), then the
    client's levels k-1 … 0. ``labels`` condition the client model; ``server_labels`` the
    server model (pass None when labels are not shared). ``*_steps`` thin the timetables (DDIM);
    the handoff level k-1 is always hit exactly. A distilled student as ``client_model`` (it
    carries ``distilled_timetable``) runs its own N deterministic DDIM steps instead.
    """
    if not (0 <= k <= schedule.T):
        raise InputError(f"k must lie in [0, {schedule.T}], got {k}")
    x = torch.from_numpy(initial_noise(seed, (n, *shape))).to(device)
    x = run_levels(server_model, schedule, x, server_timetable(schedule.T, k, server_steps),
                   server_labels, sampler=sampler, eta=eta, seed=seed, progress=progress, desc="server")
    handoff = x.clone()
    distilled = getattr(client_model, "distilled_timetable", None)
    if distilled is not None:  # a few-step student (collafuse.distill.load_student): its own timetable
        x = run_distilled(client_model, schedule, x, distilled, labels, seed=seed, progress=progress)
    else:
        x = run_levels(client_model, schedule, x, client_timetable(k, client_steps), labels,
                       sampler=sampler, eta=eta, seed=seed, progress=progress, desc="client")
    return SplitSample(handoff=handoff, images=x, handoff_level=k - 1)
