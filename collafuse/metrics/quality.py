"""Sample quality against held-out real images: FD and KD in classifier feature space (docs/architecture.md#metrics).

These are FID/KID's formulas on the features of :mod:`collafuse.metrics.features` (the
project's classifier, or a user-supplied network); report them as "FD/KD in classifier feature
space". Lower = closer to the real images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .distances import frechet_distance, kernel_distance
from .features import FeatureExtractor


@dataclass(frozen=True)
class QualityScores:
    fd: float  # Fréchet distance of the feature Gaussians
    kd_mean: float  # KD (unbiased MMD², cubic kernel), mean over subsets
    kd_std: float
    num_generated: int
    num_real: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quality_scores(
    generated: np.ndarray,
    real: np.ndarray,
    extractor: FeatureExtractor,
    *,
    real_features: np.ndarray | None = None,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> QualityScores:
    """FD and KD between ``generated`` ``[N, C, H, W]`` and ``real`` ``[M, C, H, W]`` images.

    ``real_features`` ``[M, D]`` (from the same ``extractor``) skips re-extracting the real set.
    """
    g, r = np.asarray(generated), np.asarray(real)
    if g.ndim != 4 or r.ndim != 4 or g.shape[1:] != r.shape[1:]:
        raise DataError(f"generated and real must be [N, C, H, W] with the same image shape, got "
                        f"{g.shape} and {r.shape}")
    fg = extractor.features(g, batch_size=batch_size)
    if real_features is None:
        fr = extractor.features(r, batch_size=batch_size)
    else:
        fr = np.asarray(real_features)
        if fr.shape != (len(r), fg.shape[1]):
            raise DataError(f"real_features must have shape ({len(r)}, {fg.shape[1]}), got {fr.shape}")
    kd = kernel_distance(fg, fr, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    return QualityScores(frechet_distance(fg, fr), kd.mean, kd.std, int(len(g)), int(len(r)))
