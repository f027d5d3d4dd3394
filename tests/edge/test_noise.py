"""The keyed noise generator (Philox4x32-10, vectorised): known answers, keying, statistics."""
import numpy as np
import pytest

from collafuse_edge.errors import ScheduleError
from collafuse_edge.noise import (
    StepNoiseAhead,
    initial_noise,
    keyed_normal,
    philox4x32,
    step_noise,
    step_noise_levels,
)

# Random123's published known-answer vectors for Philox4x32-10 (its tests/kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32(*(np.array([v], dtype=np.uint64) for v in (*ctr, *key)))
    assert tuple(int(o[0]) for o in out) == expected
    # Python ints take the exact-integer path that torch tensors use (16-bit partial products).
    assert tuple(int(o) for o in philox4x32(*ctr, *key)) == expected


def test_rows_are_keyed_independently_of_batch_composition():
    shape = (5, 3, 7, 7)  # 147 elements per row: not a multiple of 4
    full = step_noise(11, 40, shape)
    for r in range(5):
        row = keyed_normal(np.array([11]), np.array([40]), np.array([r]), 147).reshape(3, 7, 7)
        assert np.array_equal(full[r], row)
    # the first rows of a bigger request are the rows of a smaller one
    assert np.array_equal(step_noise(11, 40, (2, 3, 7, 7)), full[:2])
    # one vectorised call over mixed seeds and levels equals the separate draws
    mixed = keyed_normal(np.array([11, 3, 11]), np.array([40, 7, 39]), np.array([4, 0, 1]), 147)
    assert np.array_equal(mixed[0], full[4].ravel())
    assert np.array_equal(mixed[1], step_noise(3, 7, (1, 3, 7, 7)).ravel())
    assert np.array_equal(mixed[2], step_noise(11, 39, (2, 3, 7, 7))[1].ravel())


def test_levels_seeds_and_purposes_give_different_noise():
    a = step_noise(1, 5, (2, 1, 8, 8))
    assert not np.array_equal(a, step_noise(1, 6, (2, 1, 8, 8)))
    assert not np.array_equal(a, step_noise(2, 5, (2, 1, 8, 8)))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(initial_noise(1, (2, 1, 8, 8)), step_noise(1, 0, (2, 1, 8, 8)))
    assert not np.array_equal(step_noise(2**62 + 1, 5, (1, 4)), step_noise(1, 5, (1, 4)))  # high seed bits count


def test_levels_in_one_call_equal_levels_one_by_one():
    levels = [999, 500, 3, 0]
    block = step_noise_levels(8, levels, (3, 2, 5, 5))
    assert block.shape == (4, 3, 2, 5, 5) and block.dtype == np.float32
    for i, lv in enumerate(levels):
        assert np.array_equal(block[i], step_noise(8, lv, (3, 2, 5, 5)))


def test_statistics_of_a_million_draws():
    z = step_noise_levels(12345, range(64), (16, 1, 32, 32)).ravel().astype(np.float64)  # 1,048,576 draws
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 0.05  # kurtosis of a normal
    assert abs(((z - z.mean()) ** 3).mean()) < 0.02  # skew
    # tail mass beyond 3 sigma matches the normal's 0.27 % (binomial sd ~ 5e-5)
    assert abs((np.abs(z) > 3).mean() - 0.0026998) < 4e-4
    # neighbours (within a block and across blocks), rows and levels are uncorrelated
    for lag in (1, 2, 3, 4, 5, 1024):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 / np.sqrt(n)
    # a histogram against the normal CDF (chi-square, 40 bins of equal normal mass)
    from math import erf, sqrt

    edges = np.array([-np.inf] + [sqrt(2) * _erfinv(2 * q - 1) for q in np.arange(1, 40) / 40] + [np.inf])
    counts, _ = np.histogram(z, edges)
    chi2 = ((counts - n / 40) ** 2 / (n / 40)).sum()
    assert chi2 < 80, chi2  # 39 degrees of freedom: p ≈ 1e-4 at 80
    assert erf(0) == 0


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method on math.erf (enough for bin edges)."""
    from math import erf, exp, pi, sqrt

    x = 0.0
    for _ in range(60):
        x -= (erf(x) - y) / (2 / sqrt(pi) * exp(-x * x))
    return x


def test_ahead_refuses_unplanned_levels():
    ahead = StepNoiseAhead(1, (1, 1, 2, 2), [3, 2, 1])
    ahead(3)
    with pytest.raises(ScheduleError, match="not planned"):
        ahead(3)


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, True, "3"])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(ScheduleError, match="seed"):
        step_noise(bad, 1, (1, 4))


@pytest.mark.parametrize("shape", [(4,), (0, 3), (2, 0, 1)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ScheduleError, match="shape"):
        initial_noise(1, shape)


def test_bad_levels_are_refused():
    with pytest.raises(ScheduleError, match="level"):
        step_noise(1, -1, (1, 4))
    with pytest.raises(ScheduleError, match="level"):
        step_noise(1, 2**32, (1, 4))
