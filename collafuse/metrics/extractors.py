"""Where feature extractors come from: the per-dataset cache and user-supplied files (docs/architecture.md#metrics).

* :func:`get_feature_net` — a user file when given, else the project's classifier trained once
  per dataset and cached under a key of the dataset's name, shape and content hash.
* :func:`load_feature_extractor` — a collafuse ``<stem>.safetensors`` + ``<stem>.json`` pair
  (see :meth:`FeatureNet.save`), or else a **TorchScript** file loaded with ``torch.jit.load``
  whose ``forward`` maps float32 ``[B, C, H, W]`` images in [-1, 1] to features ``[B, D]``
  (e.g. an Inception exported with ``torch.jit.save``; its features are used as they are, not
  standardised). Load only TorchScript files you trust.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CheckpointError, DataError
from .features_files import _pair_paths
from .features_model import RECIPE_VERSION, FeatureNet, _check_images, _positive_int
from .features_train import DEFAULT_EPOCHS, train_feature_classifier

if TYPE_CHECKING:
    from ..data import Dataset

logger = logging.getLogger(__name__)


class TorchScriptFeatures:
    """A user-supplied TorchScript feature network: float32 ``[B, C, H, W]`` in [-1, 1] → ``[B, D]``."""

    def __init__(self, module: torch.jit.ScriptModule, path: str = "<memory>",
                 device: str | torch.device = "cpu") -> None:
        self.module = module.eval()
        self.path = path
        self.device = torch.device(device)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Images ``[N, C, H, W]`` → features ``[N, D]`` float64."""
        _positive_int("batch_size", batch_size)
        x = _check_images(images)
        out = []
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[i:i + batch_size]).to(self.device)
            try:
                f = self.module(xb)
            except Exception as e:  # TorchScript raises torch.jit.Error / RuntimeError on shape errors
                raise CheckpointError(f"TorchScript feature network {self.path!r} failed on images of "
                                      f"shape {tuple(xb.shape)}: {e}") from e
            if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != xb.shape[0]:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise CheckpointError(f"TorchScript feature network {self.path!r} must return a "
                                      f"[B, D] tensor; got {got} for a batch of {xb.shape[0]}")
            if not torch.isfinite(f).all():
                raise CheckpointError(f"TorchScript feature network {self.path!r} returned NaN or "
                                      f"infinite features for images {i}…{i + len(xb) - 1}")
            out.append(f.detach().double().cpu())
        if not out:
            raise DataError("images is empty; need at least one image to learn the feature size")
        return torch.cat(out).numpy()


def load_feature_extractor(path: str, device: str | torch.device = "cpu") -> FeatureNet | TorchScriptFeatures:
    """Load a feature network file: a collafuse ``.safetensors``/``.json`` pair (or its stem),
    otherwise a TorchScript archive via ``torch.jit.load``."""
    weights, meta = _pair_paths(path)
    if path.endswith((".safetensors", ".json")) or (os.path.isfile(weights) and os.path.isfile(meta)):
        return FeatureNet.load(path, device)
    if not os.path.isfile(path):
        raise CheckpointError(f"feature network file {path!r} does not exist; pass a collafuse "
                              "<stem>.safetensors/.json pair or a TorchScript file")
    try:
        module = torch.jit.load(path, map_location=device)
    except Exception as e:  # torch raises RuntimeError / ValueError for non-TorchScript files
        raise CheckpointError(f"{path!r} is neither a collafuse feature net pair nor a TorchScript file: {e}") from e
    return TorchScriptFeatures(module, path, device)


def dataset_key(dataset: "Dataset") -> str:
    """``<name>-<C>x<H>x<W>-n<N>-<sha256 of images, labels and num_classes, 16 hex>``."""
    x = np.ascontiguousarray(dataset.images, dtype=np.float32)
    y = np.ascontiguousarray(dataset.labels, dtype=np.int64)
    h = hashlib.sha256()
    h.update(str((x.shape, int(dataset.num_classes))).encode())
    h.update(x.tobytes())
    h.update(y.tobytes())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.name or "data")[:40]
    shape = "x".join(str(s) for s in x.shape[1:])
    return f"{name}-{shape}-n{len(x)}-{h.hexdigest()[:16]}"


def get_feature_net(
    dataset: "Dataset",
    cache_dir: str,
    *,
    user_file: str | None = None,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureNet | TorchScriptFeatures:
    """The feature extractor for ``dataset``: ``user_file`` when given (see
    :func:`load_feature_extractor`), else a :class:`FeatureNet` trained once and cached in
    ``cache_dir`` under :func:`dataset_key` (plus seed, epochs and recipe version). A corrupted
    cache entry is logged and retrained.
    """
    if user_file is not None:
        ext = load_feature_extractor(user_file, device)
        if isinstance(ext, FeatureNet):
            if tuple(ext.config.image_shape) != tuple(dataset.images.shape[1:]):
                raise CheckpointError(f"feature network {user_file!r} expects images of shape "
                                      f"{ext.config.image_shape}, dataset {dataset.name!r} has "
                                      f"{tuple(dataset.images.shape[1:])}")
        else:
            ext.features(dataset.images[:2])  # fail now, with the file's name, if the shapes don't fit
        return ext
    key = dataset_key(dataset)
    stem = os.path.join(cache_dir, f"featnet-{key}-s{seed}-e{epochs}-r{RECIPE_VERSION}")
    weights, meta = _pair_paths(stem)
    if os.path.isfile(weights) and os.path.isfile(meta):
        try:
            return FeatureNet.load(stem, device)
        except CheckpointError as e:
            logger.warning("cached feature net unusable, retraining: %s", e)
    net = train_feature_classifier(dataset.images, dataset.labels, dataset.num_classes, seed=seed,
                                   epochs=epochs, device=device, progress=progress, dataset_key=key)
    net.save(stem)
    return net
