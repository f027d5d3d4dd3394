"""Seeded noise, keyed by (seed, purpose, level, row), shared by every sampler in the project.

The noise a sampler draws at a level depends only on the request seed, the level and the shape,
never on who runs the step or on what ran before. So the server's half of a chain, the client's
half, and an unsplit chain with the same seed all see the same draws, and a request batched with
others on the server gets exactly the tensors it would get alone.

The generator is **Philox4x32-10** (Salmon et al., SC'11; the counter-based generator behind
cuRAND's and JAX's "rbg" streams), written in array operations that work on numpy arrays and on
torch tensors alike (CPU or CUDA). Counter-based means random access: the draws of any
(seed, level, row) are computed directly, with no generator state to create or advance, so the
server computes the noise of 256 concurrent requests at mixed levels in one vectorised call on
the GPU, and the edge computes a whole block of levels at once. numpy's own generators cannot:
each keyed stream needs its own ``Generator`` object (~50–90 µs to create on a CPU, per request
per level), and torch's generators give different numbers on CPU and CUDA.

Layout (format version 2): the key is the 64-bit seed ``(seed & 0xFFFFFFFF, seed >> 32)``; the
counter of block ``j`` of row ``r`` is ``(j, level, purpose, r)``; each block gives four uint32
words ``w0..w3`` and four normals by Box–Muller, ``(w0, w1) → (z0, z1)``, ``(w2, w3) → (z2, z3)``
with ``u1 = (w + 1)·2⁻³² ∈ (0, 1]``, ``u2 = w·2⁻³² ∈ [0, 1)``, ``z = √(−2 ln u1)·(cos, sin)(2π u2)``
in float64, then float32. A row of ``m`` elements uses blocks ``0 … ⌈m/4⌉−1`` and drops the tail.
The Random123 known-answer vectors are checked in the tests.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ScheduleError
from .validation import is_int

NOISE_FORMAT = 2  # bumped whenever the numbers a (seed, level) gives change
PURPOSE_INITIAL = 0  # x_{T-1} ~ N(0, I)
PURPOSE_STEP = 1  # the ancestral noise of the reverse step at a level

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_PI = 2.0 * math.pi


def _check_seed(seed: int) -> int:
    if not is_int(seed) or not (0 <= seed < 2**63):
        raise ScheduleError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_level(level: int) -> int:
    if not is_int(level) or not (0 <= level < 2**32):
        raise ScheduleError(f"noise level must be an integer in [0, 2**32), got {level!r}")
    return int(level)


def _is_numpy(a) -> bool:
    return isinstance(a, np.ndarray)


def _mulhilo(a, m: int):
    """(hi, lo) 32-bit words of ``a * m`` for ``a`` int64 in [0, 2³²) and a 32-bit constant.

    numpy: one uint64 product. torch has no unsigned 64-bit product, so the constant is split
    into 16-bit halves and every partial product stays below 2⁴⁹ (exact in int64)."""
    if _is_numpy(a):  # uint64 arrays (see keyed_normal): the product wraps mod 2⁶⁴, as wanted
        p = a * np.uint64(m)
        return p >> np.uint64(32), p & np.uint64(_M32)
    p = a * (m >> 16)
    s = ((p & 0xFFFF) << 16) + a * (m & 0xFFFF)
    return (p >> 16) + (s >> 32), s & _M32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on arrays/tensors holding uint32 values (broadcast together): uint64 numpy
    arrays, int64 torch tensors, or Python ints."""
    c0, c1, c2, c3, k0, k1 = (a.astype(np.uint64) if _is_numpy(a) and a.dtype != np.uint64 else a
                              for a in (c0, c1, c2, c3, k0, k1))
    for r in range(rounds):
        if r:
            k0 = (k0 + _PHILOX_W[0]) & _M32
            k1 = (k1 + _PHILOX_W[1]) & _M32
        hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def keyed_normal(seeds, levels, rows, numel: int, purpose: int = PURPOSE_STEP):
    """Standard normals ``[R, numel]`` float32: row i drawn with key ``seeds[i]`` at
    ``levels[i]``, as row ``rows[i]`` of its tensor.

    ``seeds``, ``levels``, ``rows`` are 1-D int64 numpy arrays or torch tensors (all the same kind,
    on one device); the result is of that kind and device. Tensors are handled through their own
    methods, so this module never imports torch.
    """
    if numel < 1:
        raise ScheduleError(f"noise rows need at least one element, got {numel}")
    blocks = -(-numel // 4)
    if blocks > _M32:
        raise ScheduleError(f"{numel} elements per row exceed the noise generator's counter range")
    if _is_numpy(seeds):
        counter = np.arange(blocks, dtype=np.uint64)
        col = lambda a: np.asarray(a, dtype=np.int64).astype(np.uint64)[:, None]  # noqa: E731
    else:  # a torch tensor: int64 arithmetic on its device
        counter = seeds.new_tensor(np.arange(blocks, dtype=np.int64)).long()
        col = lambda a: a.long()[:, None]  # noqa: E731
    seeds = col(seeds)
    w0, w1, w2, w3 = philox4x32(counter[None, :], col(levels) & _M32, purpose & _M32, col(rows) & _M32,
                                seeds & _M32, seeds >> 32)
    z = _box_muller(w0, w1, w2, w3)  # [R, blocks, 4] float64
    z = z.reshape(z.shape[0], blocks * 4)[:, :numel]
    return z.astype(np.float32) if _is_numpy(z) else z.float()


def _box_muller(w0, w1, w2, w3):
    """Four normals per Philox block, in float64: ``[..., 4]`` like the words' shape."""
    scale = 2.0 ** -32
    if _is_numpy(w0):
        f64 = lambda a: a.astype(np.float64)  # noqa: E731
        log, sqrt, cos, sin = np.log, np.sqrt, np.cos, np.sin
    else:
        f64 = lambda a: a.double()  # noqa: E731
        log, sqrt, cos, sin = (lambda a: a.log()), (lambda a: a.sqrt()), (lambda a: a.cos()), (lambda a: a.sin())
    ra = sqrt(-2.0 * log((f64(w0) + 1.0) * scale))
    rb = sqrt(-2.0 * log((f64(w2) + 1.0) * scale))
    ta, tb = f64(w1) * (scale * _TWO_PI), f64(w3) * (scale * _TWO_PI)
    out = np.empty((*ra.shape, 4)) if _is_numpy(ra) else ra.new_empty((*ra.shape, 4))
    out[..., 0], out[..., 1] = ra * cos(ta), ra * sin(ta)
    out[..., 2], out[..., 3] = rb * cos(tb), rb * sin(tb)
    return out


def _rows_and_numel(shape: tuple[int, ...]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ScheduleError(f"noise shape must be [B, ...] with positive sizes, got {shape}")
    return shape[0], int(np.prod(shape[1:]))


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """x_{T-1} for a request: float32 standard normal of ``shape`` ``[B, C, H, W]``."""
    n, m = _rows_and_numel(shape)
    s = np.full(n, _check_seed(seed), np.int64)
    return keyed_normal(s, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), m, PURPOSE_INITIAL).reshape(shape)


def step_noise(seed: int, level: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise of the reverse step at ``level`` for a request: float32 ``shape``."""
    return step_noise_levels(seed, [level], shape)[0]


def step_noise_levels(seed: int, levels, shape: tuple[int, ...]) -> np.ndarray:
    """``step_noise`` of several levels in one vectorised call: float32 ``[L, *shape]``."""
    n, m = _rows_and_numel(shape)
    lv = np.asarray([_check_level(v) for v in levels], dtype=np.int64)
    s = np.full(lv.size * n, _check_seed(seed), np.int64)
    z = keyed_normal(s, np.repeat(lv, n), np.tile(np.arange(n, dtype=np.int64), lv.size), m, PURPOSE_STEP)
    return z.reshape(lv.size, *shape)


class StepNoiseAhead:
    """``step_noise(seed, level, shape)`` for a loop's levels, computed a block of levels at a
    time (≤ ``budget`` bytes per block): one vectorised call per block instead of one per level.

    Call it with the levels in the order given; each level's noise is handed out once."""

    def __init__(self, seed: int, shape: tuple[int, ...], levels, budget: int = 4 * 2**20):
        _rows_and_numel(shape)
        self.seed, self.shape, self.levels = _check_seed(seed), tuple(shape), [int(v) for v in levels]
        self.block = max(1, budget // max(1, int(np.prod(self.shape)) * 4))
        self.next: int = 0
        self.cache: dict[int, np.ndarray] = {}

    def __call__(self, level: int) -> np.ndarray:
        if level not in self.cache:
            ahead = self.levels[self.next:self.next + self.block]
            if level not in ahead:
                raise ScheduleError(f"step noise for level {level} was not planned (or was already used)")
            self.cache = dict(zip(ahead, step_noise_levels(self.seed, ahead, self.shape)))
            self.next += len(ahead)
        return self.cache.pop(level)
