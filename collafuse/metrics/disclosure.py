"""How much of a client's training data the server gets to see (docs/architecture.md#metrics).

* :func:`disclosure_scores` — the paper's metrics: KD (in classifier feature space) and mean
  pixel MSE between what the server sees (the disclosed ``x_h`` during training, the handoff
  sample during inference) and the client's training images. Higher = less disclosed.
* :func:`reconstruction_scores` — the pure metric half of our reconstruction attack: given the
  server's reconstructions (produced elsewhere, with the server's model) and the client's true
  images, PSNR to the paired source and distance to the nearest true image. Higher PSNR /
  lower distance = more disclosed.

Images are ``[N, C, H, W]`` float arrays in the model's scale ([-1, 1] for clean images; noised
images may leave that range).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .distances import (_check_range, frechet_distance, kernel_distance, nearest_neighbours,
                        per_sample_mse, per_sample_psnr)
from .features import FeatureExtractor


def _check_images(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 4:
        raise DataError(f"{name} must be a [N, C, H, W] array, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise DataError(f"{name} holds {arr.shape[0]} images; need at least 2")
    return arr


def _check_paired(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise DataError(f"paired=True needs {names[0]}[i] to come from {names[1]}[i], so equal "
                        f"shapes; got {a.shape} and {b.shape}")


@dataclass(frozen=True)
class DisclosureScores:
    """The paper's disclosure metrics for one client. Higher = less disclosed."""

    kd_mean: float  # KD(seen, client images) in classifier feature space
    kd_std: float  # std of KD over its subsets
    fd: float  # FD(seen, client images) in classifier feature space
    nn_mse: float  # mean over seen images of the pixel MSE to the closest client image
    paired_mse: float | None  # mean pixel MSE between seen[i] and its own source image; None if unpaired
    num_seen: int
    num_client_images: int

    @property
    def mse(self) -> float:
        """The paper's "mean pixel MSE": paired when the sources are known, else nearest-neighbour."""
        return self.paired_mse if self.paired_mse is not None else self.nn_mse

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mse": self.mse}


def disclosure_scores(
    seen: np.ndarray,
    client_images: np.ndarray,
    extractor: FeatureExtractor,
    *,
    paired: bool = False,
    client_features: np.ndarray | None = None,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> DisclosureScores:
    """Disclosure of ``client_images`` ``[M, C, H, W]`` by ``seen`` ``[N, C, H, W]``.

    ``paired=True`` means ``seen[i]`` was made from ``client_images[i]`` (the disclosed
    ``x_h`` of each training image), which adds ``paired_mse``. ``client_features`` ``[M, D]``
    may be passed to skip re-extracting them (they must come from the same ``extractor``).
    """
    x = _check_images(seen, "seen")
    y = _check_images(client_images, "client_images")
    if x.shape[1:] != y.shape[1:]:
        raise DataError(f"seen and client_images must have the same image shape, got "
                        f"{x.shape[1:]} and {y.shape[1:]}")
    if paired:
        _check_paired(x, y, ("seen", "client_images"))
    fx = extractor.features(x, batch_size=batch_size)
    if client_features is None:
        fy = extractor.features(y, batch_size=batch_size)
    else:
        fy = np.asarray(client_features)
        if fy.shape != (len(y), fx.shape[1]):
            raise DataError(f"client_features must have shape ({len(y)}, {fx.shape[1]}), got {fy.shape}")
    kd = kernel_distance(fx, fy, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    nn = nearest_neighbours(x, y)
    dim = int(np.prod(x.shape[1:]))
    return DisclosureScores(
        kd_mean=kd.mean,
        kd_std=kd.std,
        fd=frechet_distance(fx, fy),
        nn_mse=float(np.mean(nn.distance ** 2) / dim),
        paired_mse=float(np.mean(per_sample_mse(x, y))) if paired else None,
        num_seen=int(len(x)),
        num_client_images=int(len(y)),
    )


@dataclass(frozen=True)
class ReconstructionScores:
    """How close the server's reconstructions come to the client's true images.

    Higher PSNR / lower distance = more disclosed.
    """

    psnr_paired: float | None  # mean over pairs of PSNR(reconstructed[i], true[i]) in dB; inf if a pair matches exactly
    mse_paired: float | None  # mean over pairs of the pixel MSE
    nn_distance_mean: float  # mean L2 distance from each reconstruction to its closest true image
    nn_distance_median: float
    nn_mse_mean: float  # the same as a per-pixel MSE
    nn_psnr_mean: float  # mean PSNR to the closest true image, dB
    nn_match_rate: float | None  # share of reconstructions whose closest true image is their own source
    num_reconstructed: int
    num_true: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def reconstruction_scores(
    reconstructed: np.ndarray,
    true_images: np.ndarray,
    *,
    paired: bool = True,
    data_range: float = 2.0,
) -> ReconstructionScores:
    """Score ``reconstructed`` ``[N, C, H, W]`` against ``true_images`` ``[M, C, H, W]``.

    ``paired=True`` (then N = M) means ``reconstructed[i]`` is the server's attempt at
    ``true_images[i]`` — e.g. its denoising of that image's disclosed ``x_h``, or at inference
    its own completion of the handoff sample versus the client's final image.
    ``data_range`` is the pixel scale's max − min (2.0 for [-1, 1]).
    """
    data_range = _check_range(data_range)
    x = _check_images(reconstructed, "reconstructed")
    y = _check_images(true_images, "true_images")
    if x.shape[1:] != y.shape[1:]:
        raise DataError(f"reconstructed and true_images must have the same image shape, got "
                        f"{x.shape[1:]} and {y.shape[1:]}")
    psnr_paired = mse_paired = match = None
    nn = nearest_neighbours(x, y)
    if paired:
        _check_paired(x, y, ("reconstructed", "true_images"))
        psnr_paired = float(np.mean(per_sample_psnr(x, y, data_range)))
        mse_paired = float(np.mean(per_sample_mse(x, y)))
        match = float(np.mean(nn.index == np.arange(len(x))))
    dim = int(np.prod(x.shape[1:]))
    nn_mse = nn.distance ** 2 / dim
    with np.errstate(divide="ignore"):
        nn_psnr = 10.0 * np.log10(data_range ** 2 / nn_mse)
    return ReconstructionScores(
        psnr_paired=psnr_paired,
        mse_paired=mse_paired,
        nn_distance_mean=float(np.mean(nn.distance)),
        nn_distance_median=float(np.median(nn.distance)),
        nn_mse_mean=float(np.mean(nn_mse)),
        nn_psnr_mean=float(np.mean(nn_psnr)),
        nn_match_rate=match,
        num_reconstructed=int(len(x)),
        num_true=int(len(y)),
    )
