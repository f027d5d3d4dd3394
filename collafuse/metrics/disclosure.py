"""How much of a client's training data the server gets to see (docs/architecture.md#metrics).

* :func:`disclosure_scores` — the paper's metrics: KD (in classifier feature space) and mean
  pixel MSE between what the server sees (the disclosed ``x_h`` during training, the handoff
  sample during inference) and the client's training images. Higher = less disclosed.
* :func:`reconstruction_scores` — the pure metric half of our reconstruction attack: given the
  server's reconstructions (produced elsewhere, with the server's model) and the client's true
  images, PSNR to the paired source and distance to the nearest true image. Higher PSNR /
  lower distance = more disclosed.
* :func:`log_posterior` / :func:`posterior_attack` — the Bayes-optimal attack on a disclosure
  ``y = sqrt(ᾱ)·x_i + sqrt(1-ᾱ)·z`` with the candidates x_i known: the exact posterior over the
  candidates in log space (logsumexp), its argmax (re-identification) and its mean (the
  MSE-optimal reconstruction under that prior). No trained attack can beat it on the same
  images; ``collafuse privacy`` (:mod:`collafuse.privacy`) builds on it. n perfectly linked
  copies are one disclosure at :func:`effective_alpha_bar`.

Images are ``[N, C, H, W]`` float arrays in the model's scale ([-1, 1] for clean images; noised
images may leave that range).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

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


# ------------------------------------------------------------------ the Bayes-optimal attack

_MIN_VAR = 1e-12  # c = 0 discloses the image itself: a vanishing noise variance


def effective_alpha_bar(alpha_bar, copies):
    """n copies at ᾱ averaged act like one disclosure at ᾱ·n/(ᾱ·n + 1-ᾱ) (0 copies: ᾱ_eff = 0)."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    n = np.asarray(copies, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(n > 0, ab * n / (ab * n + 1.0 - ab), 0.0)
    return np.where(ab >= 1.0, np.where(n > 0, 1.0, 0.0), out)


def _flat64(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _row_param(v, m: int) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(m)
    if t.numel() != m:
        raise DataError(f"a per-observation parameter has {t.numel()} values for {m} observations")
    return t.reshape(m, 1)


def log_posterior(y, candidates, scale, var) -> torch.Tensor:
    """log p(i | y_m) ``[M, N]`` float64 for observations ``y`` ``[M, ...]`` of
    ``y = scale·x_i + sqrt(var)·z`` with i uniform over ``candidates`` ``[N, ...]``.

    ``scale`` and ``var`` are scalars or one value per observation. Computed as
    ``(2·scale·y·x_i - scale²·‖x_i‖²) / (2·var)`` (the ‖y‖² term is common to every candidate)
    minus its logsumexp, so it stays finite for any noise level."""
    yf, xf = _flat64(y), _flat64(candidates)
    if yf.shape[1] != xf.shape[1]:
        raise DataError(f"observations have {yf.shape[1]} values each, candidates {xf.shape[1]}")
    a = _row_param(scale, len(yf))
    v = _row_param(var, len(yf)).clamp_min(_MIN_VAR)
    logits = (2.0 * a * (yf @ xf.T) - a * a * (xf * xf).sum(1)[None, :]) / (2.0 * v)
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


@dataclass(frozen=True)
class PosteriorAttack:
    """The Bayes-optimal attack's answers for M observations against N candidates."""

    argmax: np.ndarray  # [M] the most probable source
    mean: np.ndarray  # [M, D] the posterior-mean reconstruction
    max_prob: np.ndarray  # [M] the posterior probability of the argmax (the attacker's confidence)


def posterior_attack(y, candidates, scale, var, chunk: int = 512) -> PosteriorAttack:
    """:func:`log_posterior` in chunks of observations (memory M×N bounded by ``chunk``·N)."""
    yf, xf = _flat64(y), _flat64(candidates)
    m = len(yf)
    a, v = _row_param(scale, m), _row_param(var, m)
    arg, mean, top = [], [], []
    with torch.no_grad():
        for s in range(0, m, chunk):
            lp = log_posterior(yf[s:s + chunk], xf, a[s:s + chunk], v[s:s + chunk])
            best = lp.max(dim=1)
            arg.append(best.indices)
            top.append(best.values.exp())
            mean.append(lp.exp() @ xf)
    return PosteriorAttack(torch.cat(arg).numpy(), torch.cat(mean).numpy(), torch.cat(top).numpy())


def bayes_reconstruction_scores(disclosed: np.ndarray, true_images: np.ndarray, alpha_bar: float,
                                data_range: float = 2.0) -> ReconstructionScores:
    """The Bayes-optimal attack scored like the trained server's: ``disclosed[i]`` is the x_h of
    ``true_images[i]`` at ``alpha_bar``, the candidates are ``true_images`` themselves, and the
    reconstruction is the posterior mean (paired PSNR, nearest-neighbour match rate)."""
    x = _check_images(disclosed, "disclosed")
    y = _check_images(true_images, "true_images")
    _check_paired(x, y, ("disclosed", "true_images"))
    att = posterior_attack(x, y, np.sqrt(alpha_bar), 1.0 - alpha_bar)
    return reconstruction_scores(att.mean.reshape(y.shape), y, paired=True, data_range=data_range)
