"""Seeded noise, keyed by (seed, purpose, level), shared by every sampler in the project.

The noise a sampler draws at a level depends only on the request seed, the level and the shape,
never on who runs the step or on what ran before. So the server's half of a chain, the client's
half, and an unsplit chain with the same seed all see the same draws, and a request batched with
others on the server gets exactly the tensors it would get alone.
"""
from __future__ import annotations

import numpy as np

from .errors import ScheduleError

_INITIAL = 0  # x_{T-1} ~ N(0, I)
_STEP = 1  # the ancestral noise of the step at a level


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (0 <= seed < 2**63):
        raise ScheduleError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """x_{T-1} for a request: float32 standard normal of ``shape`` ``[B, C, H, W]``."""
    rng = np.random.default_rng([_check_seed(seed), _INITIAL])
    return rng.standard_normal(shape, dtype=np.float32)


def step_noise(seed: int, level: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise of the reverse step at ``level`` for a request: float32 ``shape``."""
    if level < 0:
        raise ScheduleError(f"step noise level must be ≥ 0, got {level}")
    rng = np.random.default_rng([_check_seed(seed), _STEP, int(level)])
    return rng.standard_normal(shape, dtype=np.float32)
