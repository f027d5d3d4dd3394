"""The feature net behind "FD/KD in classifier feature space": its config, its training report,
the :class:`FeatureNet` module and its inference. Training is :mod:`.features_train`, the files
:mod:`.features_files`; :mod:`collafuse.metrics.features` is the public entry point."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from collafuse_edge.validation import check_int

from ..errors import ConfigError, DataError
from ..threads import torch_threads

# Bump when the architecture or the training recipe changes, so that caches retrain.
RECIPE_VERSION = 1


def _positive_int(name: str, value: object) -> None:
    check_int(name, value, low=1, error=ConfigError)


@dataclass(frozen=True)
class FeatureNetConfig:
    """Architecture of :class:`FeatureNet`. Input ``[B, *image_shape]``, features ``[B, feature_dim]``."""

    image_shape: tuple[int, int, int] = (1, 16, 16)  # (C, H, W) of the images it accepts
    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32, 64)  # conv channels per stage; max-pool 2× between stages
    feature_dim: int = 128  # size of the embedding layer whose output is the feature vector

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(self.image_shape))
        object.__setattr__(self, "widths", tuple(self.widths))
        if len(self.image_shape) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {self.image_shape!r}")
        for v in self.image_shape:
            _positive_int("image_shape[i]", v)
        _positive_int("num_classes", self.num_classes)
        _positive_int("feature_dim", self.feature_dim)
        if not self.widths:
            raise ConfigError("widths must not be empty")
        for w in self.widths:
            _positive_int("widths[i]", w)
        down = 2 ** (len(self.widths) - 1)
        if min(self.image_shape[1:]) < down:
            raise ConfigError(f"image_shape {self.image_shape} is too small for {len(self.widths)} "
                              f"pooling stages; H and W must be ≥ {down}")


@dataclass(frozen=True)
class TrainingReport:
    """How a feature net was trained and how well it classifies held-out images."""

    test_accuracy: float  # on a stratified held-out split never used for training
    num_train: int
    num_test: int
    epochs: int
    seed: int
    train_seconds: float
    dataset_key: str = ""  # cache key of the training data ("" when not trained via the cache)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that maps images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]`` float64."""

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        ...


def _check_images(images: object, name: str = "images",
                  shape: tuple[int, int, int] | None = None) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise DataError(f"{name} must be a [N, C, H, W] array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise DataError(f"{name} has image shape {tuple(arr.shape[1:])} but the feature network "
                        f"expects {tuple(shape)}; resize the images or use a matching network")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values")
    return arr


class FeatureNet(nn.Module):
    """A small CNN classifier; its embedding layer is the feature space.

    ``[B, C, H, W]`` → conv3×3-BN-ReLU per width, max-pool 2× between them → adaptive
    avg-pool to 4×4 → linear to ``feature_dim`` (the embedding) → ReLU → linear to
    ``num_classes`` (the logits). About 0.16 M parameters with the default config.

    The features are the embedding standardised per dimension with the mean and std it had on
    the training images (buffers ``feature_mean``/``feature_std``, saved with the weights).
    That fixes the arbitrary scale of a trained layer, which matters for KD: its kernel
    ``(x·y/d + 1)³`` is not scale-invariant, and unscaled embeddings gave KD values in the
    thousands, dominated by subset noise.
    """

    def __init__(self, config: FeatureNetConfig, report: TrainingReport | None = None) -> None:
        super().__init__()
        self.config = config
        self.report = report
        layers: list[nn.Module] = []
        c_in = config.image_shape[0]
        for i, w in enumerate(config.widths):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = w
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.embed = nn.Linear(c_in * 16, config.feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(config.feature_dim, config.num_classes))
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → raw embedding ``[B, feature_dim]`` (pre-activation, so full rank)."""
        return self.embed(self.trunk(x))

    def standardized_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → the features ``[B, feature_dim]``: the embedding standardised."""
        return (self.embedding(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → logits ``[B, num_classes]``."""
        return self.head(self.embedding(x))

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def _batched(self, fn, images: np.ndarray, batch_size: int, num_threads: int | None) -> list[torch.Tensor]:
        _positive_int("batch_size", batch_size)
        x = _check_images(images, "images", self.config.image_shape)
        was_training = self.training
        self.eval()
        try:
            with torch_threads(num_threads if self._device().type == "cpu" else None):
                return [fn(torch.from_numpy(x[i:i + batch_size]).to(self._device())).cpu()
                        for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)

    def features(self, images: np.ndarray, batch_size: int = 256, num_threads: int | None = 1) -> np.ndarray:
        """Images ``[N, C, H, W]`` in [-1, 1] → standardised features ``[N, feature_dim]`` float64.

        ``num_threads`` caps torch's CPU threads meanwhile (see :func:`collafuse.threads.torch_threads`).
        """
        out = self._batched(self.standardized_embedding, images, batch_size, num_threads)
        if not out:
            return np.zeros((0, self.feature_dim), np.float64)
        return torch.cat(out).double().numpy()

    def predict(self, images: np.ndarray, batch_size: int = 256, num_threads: int | None = 1) -> np.ndarray:
        """Images ``[N, C, H, W]`` → predicted class ``[N]`` int64."""
        out = self._batched(lambda xb: self(xb).argmax(1), images, batch_size, num_threads)
        return torch.cat(out).numpy() if out else np.zeros((0,), np.int64)

    @torch.no_grad()
    def fit_feature_scale(self, images: np.ndarray, batch_size: int = 256) -> None:
        """Set ``feature_mean``/``feature_std`` from the raw embedding of ``images`` ``[N, C, H, W]``."""
        e = torch.cat(self._batched(self.embedding, images, batch_size, 1)).double()
        if len(e) < 2:
            raise DataError(f"images holds {len(e)} images; need at least 2 to fit the feature scale")
        self.feature_mean.copy_(e.mean(0).to(self.feature_mean))
        # a dead dimension has std 0; leave it unscaled rather than divide by zero
        std = e.std(0)
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).to(self.feature_std))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of ``images`` ``[N, C, H, W]`` whose predicted class equals ``labels`` ``[N]``."""
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise DataError(f"labels must have shape ({len(images)},), got {labels.shape}")
        return float(np.mean(self.predict(images) == labels)) if len(labels) else float("nan")

    # ----------------------------------------------------------------------------- files

    def save(self, path: str) -> tuple[str, str]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically; return both paths (see
        :func:`collafuse.metrics.features_files.save_feature_net`)."""
        from .features_files import save_feature_net

        return save_feature_net(self, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "FeatureNet":
        """Read a pair written by :meth:`save`. Raises :class:`CheckpointError` naming what is wrong."""
        from .features_files import load_feature_net

        return load_feature_net(path, device, cls=cls)
