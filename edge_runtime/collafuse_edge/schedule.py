"""DDPM schedule maths: the one source of truth shared by the torch core and the numpy edge runtime.

Tables are numpy float64, computed once. Step functions take the model output *and the noise*
as arguments and work on numpy arrays or torch tensors alike (duck-typed: only ``*``, ``+``,
``-`` and ``.clip`` are used on the sample), so the torch sampler and the edge sampler run the
same formulas and cannot drift. Conventions follow diffusers (docs/architecture.md#the-method):

* levels are ``0 … T-1``; the sampler starts from pure noise at level ``T-1``;
* the step at level ``t`` yields the sample at level ``prev_t`` (``t-1`` for full DDPM);
  ``prev_t = -1`` means the clean image (``ᾱ_{-1} = 1``);
* a cut ratio ``c`` gives the client ``k = round(c·T)`` levels ``k-1 … 0``; the server runs
  ``T-1 … k``; the handoff sample is the sample at level ``k-1``.

Example::

    s = Schedule.create(1000, "linear")
    x = s.add_noise(x0, eps, t)                     # q(x_t | x_0)
    x = ddpm_step(s, x, eps_hat, t, t - 1, noise)    # one reverse step
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Sequence

import numpy as np

from .errors import ScheduleError
from .validation import check_int, is_number

BetaScheduleName = Literal["linear", "cosine"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "cosine")
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# A distilled client runs its student over the timetable its bundle records, each step a
# deterministic DDIM step (eta = 0): see :func:`distilled_timetable`.
DISTILLED = "distilled"


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Betas ``[T]`` float64 exactly as diffusers defines ``linear`` and ``squaredcos_cap_v2``."""
    check_int("num_train_timesteps", num_train_timesteps, low=2, error=ScheduleError)
    if beta_schedule == "linear":
        if not (0.0 < beta_start < beta_end < 1.0):
            raise ScheduleError(
                f"linear schedule needs 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}"
            )
        return np.linspace(beta_start, beta_end, int(num_train_timesteps), dtype=np.float64)
    if beta_schedule in ("cosine", "squaredcos_cap_v2"):

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = int(num_train_timesteps)
        return np.array(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
            dtype=np.float64,
        )
    raise ScheduleError(
        f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}"
    )


def _coef(values: np.ndarray, like: Any) -> Any:
    """Reshape per-row coefficients ``[B]`` to broadcast over ``like`` ``[B, ...]`` in its dtype.

    Works for numpy arrays and torch tensors without importing torch.
    """
    shape = (-1,) + (1,) * (like.ndim - 1)
    if isinstance(like, np.ndarray):
        return values.astype(like.dtype, copy=False).reshape(shape)
    if like.device.type == "cpu":
        return like.new_tensor(values).reshape(shape)  # torch.Tensor: same dtype and device
    # An accelerator: a copy from pinned memory does not wait for the kernels queued before it
    # (a pageable copy synchronises the stream, which would serialise host and device per step).
    host = like.new_tensor(values, device="cpu").pin_memory()
    return host.to(like.device, non_blocking=True).reshape(shape)


def _as_levels(t: Any, batch: int, name: str) -> np.ndarray:
    """A level argument (int, sequence, numpy or torch) as int64 ``[B]``."""
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().cpu().numpy()
    arr = np.asarray(t)
    if arr.dtype.kind not in "iu":
        raise ScheduleError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim == 0:
        arr = np.full(batch, int(arr), dtype=np.int64)
    if arr.shape != (batch,):
        raise ScheduleError(f"{name} must be a scalar or have shape [{batch}], got {arr.shape}")
    return arr


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule. ``betas`` is float64 ``[T]``; the other tables derive from it."""

    betas: np.ndarray
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    alphas: np.ndarray = field(init=False, repr=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ScheduleError(f"betas must be a 1-D array of length ≥ 2, got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            raise ScheduleError("betas must be finite and strictly inside (0, 1)")
        if self.prediction_type != "epsilon":
            raise ScheduleError(
                f"prediction_type {self.prediction_type!r} is not supported; only 'epsilon'"
            )
        if self.clip_sample_range <= 0:
            raise ScheduleError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas", 1.0 - betas)
        object.__setattr__(self, "alphas_cumprod", np.cumprod(1.0 - betas))

    @classmethod
    def create(
        cls,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = True,
    ) -> "Schedule":
        name = "cosine" if beta_schedule == "squaredcos_cap_v2" else beta_schedule
        return cls(
            make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end),
            beta_schedule=name,
            clip_sample=clip_sample,
        )

    @property
    def T(self) -> int:
        return int(self.betas.size)

    def alpha_bar(self, t: Any) -> np.ndarray:
        """ᾱ at levels ``t`` (int64 array); level -1 (the clean image) has ᾱ = 1."""
        t = np.asarray(t, dtype=np.int64)
        if np.any(t < -1) or np.any(t >= self.T):
            raise ScheduleError(f"levels must lie in [-1, {self.T - 1}], got {t.min()}…{t.max()}")
        ab = np.ones(t.shape, dtype=np.float64)
        pos = t >= 0
        ab[pos] = self.alphas_cumprod[t[pos]]
        return ab

    def check_level(self, t: int, name: str = "level") -> int:
        check_int(name, t, low=0, high=self.T - 1, error=ScheduleError)
        return int(t)

    def add_noise(self, x0: Any, noise: Any, t: Any) -> Any:
        """q(x_t | x_0) = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise, per-row levels ``t`` ``[B]``."""
        lv = _as_levels(t, x0.shape[0], "t")
        ab = self.alpha_bar(lv)
        return _coef(np.sqrt(ab), x0) * x0 + _coef(np.sqrt(1 - ab), x0) * noise

    def renoise(self, x_h: Any, noise: Any, t: Any, h: Any) -> Any:
        """The Markov marginal q(x_t | x_h) for t > h: sqrt(ᾱ_t/ᾱ_h)·x_h + sqrt(1-ᾱ_t/ᾱ_h)·noise."""
        lv = _as_levels(t, x_h.shape[0], "t")
        hv = _as_levels(h, x_h.shape[0], "h")
        if np.any(lv <= hv):
            raise ScheduleError("renoise needs t > h on every row")
        ratio = self.alpha_bar(lv) / self.alpha_bar(hv)
        return _coef(np.sqrt(ratio), x_h) * x_h + _coef(np.sqrt(1 - ratio), x_h) * noise

    def to_dict(self) -> dict:
        """JSON-ready description (the bundle manifest and ``/v1/info`` carry this)."""
        return {
            "num_train_timesteps": self.T,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "clip_sample": self.clip_sample,
            "clip_sample_range": self.clip_sample_range,
            "betas": [float(b) for b in self.betas],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        try:
            betas = np.asarray(d["betas"], dtype=np.float64)
            sched = cls(
                betas,
                beta_schedule=str(d.get("beta_schedule", "custom")),
                prediction_type=str(d.get("prediction_type", "epsilon")),
                clip_sample=bool(d.get("clip_sample", True)),
                clip_sample_range=float(d.get("clip_sample_range", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ScheduleError):
                raise
            raise ScheduleError(f"invalid schedule description: {e}") from e
        if "num_train_timesteps" in d and int(d["num_train_timesteps"]) != sched.T:
            raise ScheduleError(
                f"schedule says num_train_timesteps={d['num_train_timesteps']} but has {sched.T} betas"
            )
        return sched

    def same_as(self, other: "Schedule", rtol: float = 1e-9) -> bool:
        return (
            self.T == other.T
            and self.prediction_type == other.prediction_type
            and self.clip_sample == other.clip_sample
            and np.allclose(self.betas, other.betas, rtol=rtol, atol=0)
        )


# ---------------------------------------------------------------------------------------------
# cut ratio arithmetic


def client_level_count(cut_ratio: float, T: int) -> int:
    """k = round(c·T), the number of levels (k-1 … 0) the client runs. Halves round up."""
    if not is_number(cut_ratio):
        raise ScheduleError(f"cut ratio must be a number in [0, 1], got {cut_ratio!r}")
    c = float(cut_ratio)
    if not (0.0 <= c <= 1.0):
        raise ScheduleError(f"cut ratio must lie in [0, 1], got {cut_ratio!r}")
    return int(math.floor(c * T + 0.5))


def handoff_level(cut_ratio: float, T: int) -> int:
    """The level of the handoff sample, k-1 (-1 when c = 0: the server returns a clean image)."""
    return client_level_count(cut_ratio, T) - 1


# ---------------------------------------------------------------------------------------------
# timetables


def _spaced(start: int, stop: int, steps: int | None) -> np.ndarray:
    """Descending levels from ``start`` towards ``stop``; ``steps`` of them evenly spaced.

    ``start`` is always first (a sampler must begin at the level its sample is at); with
    ``steps ≥ 2`` ``stop`` is included too.
    """
    if start < stop:
        return np.zeros(0, dtype=np.int64)
    full = start - stop + 1
    if steps is None or steps >= full:
        return np.arange(start, stop - 1, -1, dtype=np.int64)
    if steps < 1:
        raise ScheduleError(f"step count must be ≥ 1, got {steps}")
    if steps == 1:
        return np.array([start], dtype=np.int64)
    lv = np.round(np.linspace(start, stop, steps)).astype(np.int64)
    return np.unique(lv)[::-1].copy()


@dataclass(frozen=True)
class Timetable:
    """The levels a sampler evaluates, in order, and where the last step lands.

    ``levels[i]`` steps to ``levels[i+1]``; the last level steps to ``end`` (the handoff level
    for the server half, -1 for the client half).
    """

    levels: np.ndarray
    end: int

    def __post_init__(self) -> None:
        lv = np.asarray(self.levels, dtype=np.int64)
        if lv.ndim != 1 or (lv.size > 1 and np.any(np.diff(lv) >= 0)):
            raise ScheduleError("timetable levels must be strictly decreasing")
        if lv.size and lv[-1] <= self.end:
            raise ScheduleError(f"timetable must end above its target level {self.end}")
        object.__setattr__(self, "levels", lv)

    def pairs(self) -> list[tuple[int, int]]:
        nxt = list(self.levels[1:]) + [self.end]
        return [(int(a), int(b)) for a, b in zip(self.levels, nxt)]

    def __len__(self) -> int:
        return int(self.levels.size)


def server_timetable(T: int, k: int, steps: int | None = None) -> Timetable:
    """Levels T-1 … k (``steps`` of them, T-1 always first), the last step landing exactly on
    the handoff level k-1."""
    return Timetable(_spaced(T - 1, k, steps), end=k - 1)


def client_timetable(k: int, steps: int | None = None) -> Timetable:
    """Levels k-1 … 0 (``steps`` of them, the handoff level k-1 always first), ending at the
    clean image."""
    return Timetable(_spaced(k - 1, 0, steps), end=-1)


def distilled_timetable(k: int, steps: int) -> Timetable:
    """The timetable of a distilled (few-step) client: ``steps`` levels at the fractions
    (steps-i)/steps of the client's segment, ``round(k·(steps-i)/steps) - 1`` for i = 0 … steps-1,
    ending at the clean image. The handoff level k-1 is first, and the timetable of n steps is
    contained in that of 2n (every other level), which progressive distillation relies on."""
    check_int("k (client levels)", k, low=1, error=ScheduleError)
    check_int("steps", steps, low=1, high=k, error=ScheduleError)
    lv = [int(math.floor(k * (steps - i) / steps + 0.5)) - 1 for i in range(steps)]
    return Timetable(np.asarray(lv, dtype=np.int64), end=-1)


# ---------------------------------------------------------------------------------------------
# reverse steps


@dataclass(frozen=True)
class StepCoefficients:
    """The float64 coefficients of reverse steps ``t → prev`` (one entry per row or per level),
    computed by :func:`step_coefficients`, the one place the DDPM/DDIM step maths lives:

    * x̂0 = clip((x − x0_eps·ε̂)·x0_x)   (``pred_original_sample`` in diffusers);
    * DDPM: out = c_x0·x̂0 + c_other·x;  DDIM: out = c_x0·x̂0 + c_other·ε̂;
    * then out += sigma·noise where ``adds_noise``.

    The step functions apply them to a batch; the edge sampler hoists them out of its loop.
    """

    sampler: str  # "ddpm" | "ddim"
    t: np.ndarray  # int64 levels
    prev: np.ndarray  # int64 levels the steps land on (-1 = the clean image)
    x0_x: np.ndarray  # 1/sqrt(ᾱ_t)
    x0_eps: np.ndarray  # sqrt(1-ᾱ_t)
    c_x0: np.ndarray
    c_other: np.ndarray  # multiplies x (DDPM) or ε̂ (DDIM)
    sigma: np.ndarray
    adds_noise: np.ndarray  # bool: the step adds sigma·noise


def step_coefficients(
    schedule: Schedule, t: Any, prev_t: Any, sampler: str = "ddpm", eta: float = 0.0
) -> StepCoefficients:
    """The coefficients of the reverse steps from levels ``t`` to ``prev_t`` (int or int arrays of
    one shape; every ``prev_t`` below its ``t``) for ``sampler`` with DDIM stochasticity ``eta``.

    DDPM is the ancestral step with ``fixed_small`` variance (``diffusers.DDPMScheduler.step``);
    DDIM is ``diffusers.DDIMScheduler.step`` with ``set_alpha_to_one=True`` and
    ``use_clipped_model_output=False``.
    """
    if sampler not in SAMPLERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta < 0:
        raise ScheduleError(f"eta must be ≥ 0, got {eta}")
    lv = np.asarray(t, dtype=np.int64)
    pv = np.asarray(prev_t, dtype=np.int64)
    if np.any(pv >= lv):
        raise ScheduleError("prev_t must be below t on every row")
    ab_t = schedule.alpha_bar(lv)
    ab_p = schedule.alpha_bar(pv)
    x0_x, x0_eps = 1 / np.sqrt(ab_t), np.sqrt(1 - ab_t)
    if sampler == "ddpm":
        alpha_t = ab_t / ab_p
        beta_t = 1 - alpha_t
        c_x0 = np.sqrt(ab_p) * beta_t / (1 - ab_t)
        c_other = np.sqrt(alpha_t) * (1 - ab_p) / (1 - ab_t)
        sigma = np.where(lv > 0, np.sqrt(np.maximum((1 - ab_p) / (1 - ab_t) * beta_t, 1e-20)), 0.0)
        adds = sigma > 0
    else:
        var = (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)
        sigma = eta * np.sqrt(var)
        c_x0 = np.sqrt(ab_p)
        c_other = np.sqrt(np.maximum(1 - ab_p - sigma**2, 0.0))
        adds = (sigma > 0) & (eta > 0)
    return StepCoefficients(sampler, lv, pv, x0_x, x0_eps, c_x0, c_other, sigma, np.asarray(adds))


class StepResult(NamedTuple):
    """A step's output with ``return_x0=True``: the sample at ``prev_t`` and the predicted clean
    sample x̂0 it was built from (diffusers' ``prev_sample`` / ``pred_original_sample``)."""

    prev_sample: Any
    pred_x0: Any


def _x0(schedule: Schedule, x0_x: np.ndarray, x0_eps: np.ndarray, x: Any, eps: Any,
        clip: bool | None = None) -> Any:
    x0 = (x - _coef(x0_eps, x) * eps) * _coef(x0_x, x)
    if schedule.clip_sample if clip is None else clip:
        r = schedule.clip_sample_range
        x0 = x0.clip(-r, r)
    return x0


def _apply(schedule: Schedule, c: StepCoefficients, x: Any, eps: Any, noise: Any | None,
           no_noise: str, return_x0: bool) -> Any:
    """``c`` (per-row) on a batch ``x``, ``eps``, ``noise`` ``[B, ...]``, numpy or torch."""
    x0 = _x0(schedule, c.x0_x, c.x0_eps, x, eps)
    out = _coef(c.c_x0, x) * x0 + _coef(c.c_other, x) * (x if c.sampler == "ddpm" else eps)
    if np.any(c.adds_noise):
        if noise is None:
            raise ScheduleError(no_noise)
        out = out + _coef(c.sigma, x) * noise
    return StepResult(out, x0) if return_x0 else out


def predict_x0(schedule: Schedule, x: Any, eps: Any, t: Any, *, clip: bool | None = None) -> Any:
    """x̂0 = (x_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t), clipped when the schedule says so (``clip``:
    override that; ``clip=False`` is the exact inversion of :meth:`Schedule.add_noise`)."""
    lv = _as_levels(t, x.shape[0], "t")
    ab = schedule.alpha_bar(lv)
    return _x0(schedule, 1 / np.sqrt(ab), np.sqrt(1 - ab), x, eps, clip)


def ddpm_step(
    schedule: Schedule, x: Any, eps: Any, t: Any, prev_t: Any, noise: Any | None, *, return_x0: bool = False
) -> Any:
    """One ancestral DDPM step from level ``t`` to ``prev_t`` (``fixed_small`` variance).

    ``x``, ``eps``, ``noise``: ``[B, C, H, W]``; ``t``, ``prev_t``: int or ``[B]``. Rows with
    ``t == 0`` add no noise (``noise`` may be None only if every row has t == 0).
    Matches ``diffusers.DDPMScheduler.step`` for the same noise. With ``return_x0`` the result
    is a :class:`StepResult` (the sample and x̂0).
    """
    B = x.shape[0]
    c = step_coefficients(schedule, _as_levels(t, B, "t"), _as_levels(prev_t, B, "prev_t"), "ddpm")
    return _apply(schedule, c, x, eps, noise, "ddpm_step needs noise for rows with t > 0", return_x0)


def ddim_step(
    schedule: Schedule,
    x: Any,
    eps: Any,
    t: Any,
    prev_t: Any,
    noise: Any | None = None,
    eta: float = 0.0,
    *,
    return_x0: bool = False,
) -> Any:
    """One DDIM step from ``t`` to any lower ``prev_t`` (-1 = clean). Matches
    ``diffusers.DDIMScheduler.step`` (``set_alpha_to_one=True``, ``use_clipped_model_output=False``).
    With ``return_x0`` the result is a :class:`StepResult` (the sample and x̂0).
    """
    B = x.shape[0]
    c = step_coefficients(schedule, _as_levels(t, B, "t"), _as_levels(prev_t, B, "prev_t"), "ddim", eta)
    return _apply(schedule, c, x, eps, noise, "ddim_step with eta > 0 needs noise", return_x0)


def step(
    sampler: str,
    schedule: Schedule,
    x: Any,
    eps: Any,
    t: Any,
    prev_t: Any,
    noise: Any | None,
    eta: float = 0.0,
    *,
    return_x0: bool = False,
) -> Any:
    """Dispatch to :func:`ddpm_step` or :func:`ddim_step` by name."""
    if sampler == "ddpm":
        return ddpm_step(schedule, x, eps, t, prev_t, noise, return_x0=return_x0)
    if sampler == "ddim":
        return ddim_step(schedule, x, eps, t, prev_t, noise, eta, return_x0=return_x0)
    raise ScheduleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def needs_noise(sampler: str, t: int, eta: float = 0.0) -> bool:
    """Whether the step at level ``t`` consumes a noise draw."""
    if sampler == "ddpm":
        return t > 0
    return eta > 0


def levels_for(timetables: Sequence[Timetable]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for tt in timetables:
        out.extend(tt.pairs())
    return out
