"""Distances between sets of features and between images (docs/architecture.md#metrics).

* :func:`frechet_distance` (FD): the Fréchet distance between Gaussians fitted to two feature
  sets — FID's formula. With the project's classifier features it is "FD in classifier feature
  space", not FID.
* :func:`kernel_distance` (KD): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (x·y / d + 1)³`` averaged over random subsets — KID's estimator. Unbiased, so it
  can come out slightly negative when both sets come from one distribution.
* Pixel-space :func:`mse`, :func:`psnr` (whole arrays or per sample) and
  :func:`nearest_neighbours` (chunked exact L2 nearest neighbour).

Features are ``[N, D]`` arrays, images ``[N, C, H, W]`` (any shape with a leading sample axis);
everything is computed in float64.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from collafuse_edge.validation import check_int

from ..errors import ConfigError, DataError


def _positive_int(name: str, value: object) -> None:
    check_int(name, value, low=1, error=ConfigError)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the small dense linear algebra of FD/KD on one BLAS thread.

    For D ≈ 128 matrices thread start-up dominates, and next to torch's OpenMP pool on a busy
    2-core machine a 128×128 ``eigh`` took 350 ms on 2 OpenBLAS threads versus 2.4 ms on one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, keep the defaults
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _check_features(x: object, name: str, min_rows: int = 2) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a [N, D] feature array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] < min_rows:
        raise DataError(f"{name} has {arr.shape[0]} rows; need at least {min_rows} samples")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values")
    return arr


def _check_pair(a: object, b: object, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        raise DataError(f"{names[0]} and {names[1]} must have the same shape, got {x.shape} and {y.shape}")
    for arr, n in ((x, names[0]), (y, names[1])):
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{n} must be numeric, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{n} contains NaN or infinite values")
    return x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)


# --------------------------------------------------------------------------- Fréchet distance


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``[D]`` and covariance ``[D, D]`` of ``num_samples`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    num_samples: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Fit a Gaussian to ``features`` ``[N, D]`` (N ≥ 2; unbiased covariance)."""
    f = _check_features(features, "features")
    return FeatureStats(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), int(f.shape[0]))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """``|μa − μb|² + tr Σa + tr Σb − 2 tr (Σa Σb)^½``.

    The trace term is computed as ``Σ √eig(Σa^½ Σb Σa^½)``: that matrix is symmetric PSD, so
    the square root is real and stable even for singular covariances (where ``sqrtm(Σa Σb)``
    needs an ε offset and returns complex round-off). Round-off below zero is clamped to 0.
    """
    if a.mean.shape != b.mean.shape:
        raise DataError(f"feature sizes differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    with _one_blas_thread():
        sa = _psd_sqrt(a.cov)
        inner = sa @ b.cov @ sa
        tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None))))
    diff = a.mean - b.mean
    fd = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FD between feature sets ``[Na, D]`` and ``[Nb, D]`` (each N ≥ 2)."""
    fa = _check_features(features_a, "features_a")
    fb = _check_features(features_b, "features_b")
    if fa.shape[1] != fb.shape[1]:
        raise DataError(f"features_a and features_b must have the same feature size, got "
                        f"{fa.shape[1]} and {fb.shape[1]}")
    return frechet_distance_from_stats(feature_stats(fa), feature_stats(fb))


# ---------------------------------------------------------------------------- kernel distance


@dataclass(frozen=True)
class KernelDistance:
    """KD (unbiased MMD², cubic polynomial kernel) over ``num_subsets`` random subsets."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of ``x`` ``[m, D]`` and ``y`` ``[n, D]`` with ``k = (x·y/D + 1)³``."""
    d = x.shape[1]
    m, n = x.shape[0], y.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def kernel_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KernelDistance:
    """KD between ``[Na, D]`` and ``[Nb, D]``: mean and std of the unbiased MMD² over
    ``num_subsets`` pairs of subsets drawn without replacement, each of
    ``min(subset_size, Na, Nb)`` rows (at least 2). Deterministic given ``seed``.
    """
    fa = _check_features(features_a, "features_a")
    fb = _check_features(features_b, "features_b")
    if fa.shape[1] != fb.shape[1]:
        raise DataError(f"features_a and features_b must have the same feature size, got "
                        f"{fa.shape[1]} and {fb.shape[1]}")
    _positive_int("num_subsets", num_subsets)
    _positive_int("subset_size", subset_size)
    if subset_size < 2:
        raise ConfigError(f"subset_size must be ≥ 2 for the unbiased estimator, got {subset_size}")
    m = int(min(subset_size, fa.shape[0], fb.shape[0]))
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets, np.float64)
    with _one_blas_thread():
        for i in range(num_subsets):
            xa = fa[rng.choice(fa.shape[0], m, replace=False)]
            xb = fb[rng.choice(fb.shape[0], m, replace=False)]
            values[i] = _polynomial_mmd2(xa, xb)
    return KernelDistance(float(values.mean()), float(values.std()), int(num_subsets), m)


# ------------------------------------------------------------------------------- pixel space


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every element of two equally shaped arrays."""
    x, y = _check_pair(a, b)
    if x.size == 0:
        raise DataError("a and b are empty")
    return float(np.mean((x - y) ** 2))


def per_sample_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, ...]`` × ``[N, ...]`` → MSE of each pair ``[N]`` float64."""
    x, y = _check_pair(a, b)
    if x.ndim < 1:
        raise DataError(f"a must have a leading sample axis, got shape {x.shape}")
    return ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)


def _check_range(data_range: float) -> float:
    if not (isinstance(data_range, (int, float, np.floating)) and np.isfinite(data_range) and data_range > 0):
        raise ConfigError(f"data_range must be a positive finite number, got {data_range!r}")
    return float(data_range)


def _psnr_from_mse(err: np.ndarray, data_range: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / err)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    """``10·log10(data_range² / MSE)`` in dB over whole arrays; ``inf`` when identical.

    ``data_range`` is max − min of the pixel scale: 2.0 for images in [-1, 1].
    """
    r = _check_range(data_range)
    return float(_psnr_from_mse(np.float64(mse(a, b)), r))


def per_sample_psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    """PSNR of each pair ``[N]`` (dB; ``inf`` for an identical pair)."""
    r = _check_range(data_range)
    return _psnr_from_mse(per_sample_mse(a, b), r)


@dataclass(frozen=True)
class NearestNeighbours:
    """For each query, the index of its nearest reference ``[Nq]`` and the L2 distance ``[Nq]``."""

    index: np.ndarray  # int64
    distance: np.ndarray  # float64

    def to_dict(self) -> dict:
        return {"index": self.index.tolist(), "distance": self.distance.tolist()}


def nearest_neighbours(
    queries: np.ndarray,
    references: np.ndarray,
    *,
    query_chunk: int = 256,
    reference_chunk: int = 4096,
) -> NearestNeighbours:
    """Exact L2 nearest reference for each query, in pixel space.

    ``queries`` ``[Nq, ...]`` and ``references`` ``[Nr, ...]`` with equal trailing shapes. The
    search uses ``|q|² + |r|² − 2 q·r`` on blocks of ``query_chunk × reference_chunk`` (that
    bounds the memory), then recomputes each winner's distance as ``|q − r|`` so an exact copy
    gives exactly 0. Ties go to the lowest reference index.
    """
    _positive_int("query_chunk", query_chunk)
    _positive_int("reference_chunk", reference_chunk)
    q, r = np.asarray(queries), np.asarray(references)
    if q.ndim < 1 or r.ndim < 1 or q.shape[1:] != r.shape[1:]:
        raise DataError(f"queries and references must share their per-sample shape, got {q.shape} and {r.shape}")
    if r.shape[0] == 0:
        raise DataError("references is empty; need at least one reference sample")
    for arr, n in ((q, "queries"), (r, "references")):
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{n} must be numeric, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{n} contains NaN or infinite values")
    nq = q.shape[0]
    q = q.reshape(nq, -1)
    r = r.reshape(r.shape[0], -1)
    best = np.full(nq, np.inf)
    index = np.zeros(nq, np.int64)
    q_norm = np.einsum("ij,ij->i", q.astype(np.float64), q.astype(np.float64)) if nq else np.zeros(0)
    for r0 in range(0, r.shape[0], reference_chunk):
        rb = r[r0:r0 + reference_chunk].astype(np.float64)
        rb_norm = np.einsum("ij,ij->i", rb, rb)
        for q0 in range(0, nq, query_chunk):
            qb = q[q0:q0 + query_chunk].astype(np.float64)
            d2 = q_norm[q0:q0 + len(qb), None] + rb_norm[None, :] - 2.0 * (qb @ rb.T)
            j = np.argmin(d2, axis=1)
            v = d2[np.arange(len(qb)), j]
            better = v < best[q0:q0 + len(qb)]
            best[q0:q0 + len(qb)][better] = v[better]
            index[q0:q0 + len(qb)][better] = j[better] + r0
    distance = np.empty(nq, np.float64)
    for q0 in range(0, nq, query_chunk):
        diff = q[q0:q0 + query_chunk].astype(np.float64) - r[index[q0:q0 + query_chunk]].astype(np.float64)
        distance[q0:q0 + len(diff)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return NearestNeighbours(index, distance)


def nearest_neighbour_distance(queries: np.ndarray, references: np.ndarray, *, query_chunk: int = 256,
                               reference_chunk: int = 4096) -> np.ndarray:
    """Per-query L2 distance ``[Nq]`` to the closest of ``references``; see :func:`nearest_neighbours`."""
    return nearest_neighbours(queries, references, query_chunk=query_chunk,
                              reference_chunk=reference_chunk).distance
