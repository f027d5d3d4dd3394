"""The client's half of the reverse chain in numpy: DDPM or DDIM from the handoff level to 0.

This is the numpy twin of ``collafuse.sampling.run_levels``: the same timetable, the same step
formulas (:func:`collafuse_edge.schedule.step_coefficients`, computed once per loop —
:func:`plan_steps`, checked bit for bit against the step functions) and the same keyed
noise (``step_noise(seed, level, shape)``), so for the same handoff sample, labels and seed the
edge and the torch sampler produce the same images.

Example::

    x0 = finish(denoiser, bundle.schedule, x_handoff, bundle.client_levels, labels,
                SamplerConfig("ddim", steps=50), seed=7)   # [B,C,H,W] float32 in [-1, 1]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import InputError
from .noise import StepNoiseAhead
from .schedule import (DISTILLED, SAMPLERS, Schedule, Timetable, client_timetable, distilled_timetable, needs_noise,
                       step_coefficients)
from .validation import check_int

# ε̂ = denoise(sample [B,C,H,W] f32, timestep [B] i64, class_labels [B] i64 | None) → [B,C,H,W] f32
DenoiseFn = Callable[[np.ndarray, np.ndarray, Optional[np.ndarray]], np.ndarray]
# called after every step with (index, level, sample after the step)
StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class SamplerConfig:
    """Which reverse process the client runs over its levels k-1 … 0.

    ``"distilled"`` is a few-step student's sampler: deterministic DDIM steps (eta = 0) over the
    ``steps`` levels of :func:`schedule.distilled_timetable` (what a distilled bundle records),
    x̂0 unclipped between steps and the final image clipped (see :func:`finish`).
    """

    sampler: str = "ddpm"  # "ddpm" (ancestral, every level), "ddim" or "distilled"
    steps: int | None = None  # levels evaluated; None = all k. Fewer thin the timetable (DDIM)
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic); ignored by DDPM

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS + (DISTILLED,):
            raise InputError(f"sampler must be one of {', '.join(SAMPLERS + (DISTILLED,))}; got {self.sampler!r}")
        check_int("steps", self.steps, low=1, allow_none=True)
        if not (self.eta >= 0):
            raise InputError(f"eta must be ≥ 0, got {self.eta!r}")
        if self.sampler == "ddpm" and self.eta != 0:
            raise InputError("eta only applies to the ddim sampler; leave it at 0 for ddpm")
        if self.sampler == DISTILLED and (self.steps is None or self.eta != 0):
            raise InputError("the distilled sampler needs its number of steps and runs with eta = 0")

    def timetable(self, client_levels: int) -> Timetable:
        """The levels this sampler evaluates on a client of ``client_levels`` levels."""
        if self.sampler == DISTILLED:
            return distilled_timetable(client_levels, self.steps)
        return client_timetable(client_levels, self.steps)

    @property
    def step_kind(self) -> str:
        """The step formula: "ddpm" or "ddim" (a distilled student takes DDIM steps)."""
        return "ddim" if self.sampler == DISTILLED else self.sampler


@dataclass(frozen=True)
class PlannedStep:
    """The float64 coefficients of one reverse step ``t → prev`` (every row at the same level).

    One level of :func:`schedule.step_coefficients` (see :class:`schedule.StepCoefficients` for
    how they combine), the function :func:`schedule.ddpm_step` / :func:`schedule.ddim_step` use
    too: the per-level table look-ups are hoisted out of the loop (they cost ~0.1 ms a step on a
    small CPU, a tenth of a denoiser call); the tests check the two agree bit for bit at every
    level.
    """

    sampler: str  # "ddpm" | "ddim"
    t: int
    prev: int
    x0_x: float
    x0_eps: float
    c_x0: float
    c_other: float
    sigma: float
    adds_noise: bool
    draws_noise: bool  # the keyed noise of level t is drawn (even if unused), as everywhere else


def plan_steps(schedule: Schedule, timetable: Timetable, sampler: str = "ddpm", eta: float = 0.0) -> list[PlannedStep]:
    """The coefficients of every step of ``timetable`` (validated like the step functions)."""
    if sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if eta < 0:
        raise InputError(f"eta must be ≥ 0, got {eta}")
    pairs = timetable.pairs()
    if not pairs:
        return []
    c = step_coefficients(schedule, [t for t, _ in pairs], [p for _, p in pairs], sampler, eta)
    return [
        PlannedStep(sampler, int(c.t[i]), int(c.prev[i]), float(c.x0_x[i]), float(c.x0_eps[i]), float(c.c_x0[i]),
                    float(c.c_other[i]), float(c.sigma[i]), bool(c.adds_noise[i]),
                    needs_noise(sampler, int(c.t[i]), eta))
        for i in range(c.t.size)
    ]


def apply_step(p: PlannedStep, schedule: Schedule, x: np.ndarray, eps: np.ndarray,
               noise: np.ndarray | None) -> np.ndarray:
    """One planned step on numpy arrays, in the dtype of ``x`` (same operations, same order as
    the schedule's step functions)."""
    dt = x.dtype.type
    x0 = (x - dt(p.x0_eps) * eps) * dt(p.x0_x)
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        x0 = x0.clip(-r, r)
    out = dt(p.c_x0) * x0 + dt(p.c_other) * (x if p.sampler == "ddpm" else eps)
    if p.adds_noise:
        if noise is None:
            raise InputError(f"the step at level {p.t} needs noise")
        out = out + dt(p.sigma) * noise
    return out


def run_levels(
    denoise: DenoiseFn,
    schedule: Schedule,
    x: np.ndarray,
    timetable: Timetable,
    labels: np.ndarray | None = None,
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Run ``denoise`` over ``timetable`` from ``x`` ``[B,C,H,W]`` float32 (the sample at
    ``timetable.levels[0]``); returns the sample at ``timetable.end``.

    The step noise at level t is ``step_noise(seed, t, x.shape)``, as in the torch sampler.
    """
    B = x.shape[0]
    plan = plan_steps(schedule, timetable, sampler, eta)
    noise_for = StepNoiseAhead(seed, x.shape, [p.t for p in plan if p.draws_noise])
    for i, p in enumerate(plan):
        eps = denoise(x, np.full(B, p.t, dtype=np.int64), labels)
        noise = noise_for(p.t) if p.draws_noise else None
        x = apply_step(p, schedule, x, eps, noise)
        if callback is not None:
            callback(i, p.t, x)
    return x


def finish(
    denoise: DenoiseFn,
    schedule: Schedule,
    handoff: np.ndarray,
    client_levels: int,
    labels: np.ndarray | None = None,
    config: SamplerConfig = SamplerConfig(),
    *,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> np.ndarray:
    """Finish handoff samples ``[B,C,H,W]`` (at level ``client_levels - 1``) to clean images."""
    tt = config.timetable(client_levels)
    if config.sampler == DISTILLED:
        # a distilled student's steps leave x̂0 unclipped (it was trained to land on its teacher's
        # samples through the unclipped step); the final image is clipped to the schedule's range
        free = dataclasses.replace(schedule, clip_sample=False)
        x = run_levels(denoise, free, handoff, tt, labels, sampler="ddim", eta=0.0, seed=seed, callback=callback)
        if schedule.clip_sample:
            x = x.clip(-schedule.clip_sample_range, schedule.clip_sample_range)
        return x
    return run_levels(denoise, schedule, handoff, tt, labels, sampler=config.step_kind,
                      eta=config.eta, seed=seed, callback=callback)
