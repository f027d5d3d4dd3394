"""The feature extractor behind "FD/KD in classifier feature space" (docs/architecture.md#metrics).

Inception weights cannot be downloaded here, so the default extractor is a small CNN
classifier that the project trains on the dataset itself; its features are the penultimate
(embedding) layer, standardised on the training images. Numbers computed with it are comparable
only between runs that use the same extractor file — report them as "FD/KD in classifier
feature space", never as FID/KID.

A trained net is saved as ``<stem>.safetensors`` (weights) + ``<stem>.json`` (architecture,
training report and the weights' sha256); nothing is unpickled. Caching per dataset and
user-supplied networks (TorchScript) live in :mod:`collafuse.metrics.extractors`.

This module is the public entry point; the code lives in :mod:`.features_model` (the net, its
config and inference), :mod:`.features_train` (the training loop) and :mod:`.features_files`
(its files).

Typical use::

    from collafuse.data import load_digits
    from collafuse.metrics import get_feature_net
    net = get_feature_net(load_digits(), "runs/.feature_cache")  # trains once, reloads after
    f = net.features(images)                                     # [N, 128] float64
"""
from __future__ import annotations

from .features_files import FORMAT, FORMAT_VERSION, _pair_paths, load_feature_net, save_feature_net
from .features_model import (RECIPE_VERSION, FeatureExtractor, FeatureNet, FeatureNetConfig, TrainingReport,
                             _check_images, _positive_int)
from .features_train import DEFAULT_EPOCHS, train_feature_classifier

__all__ = ["DEFAULT_EPOCHS", "FORMAT", "FORMAT_VERSION", "RECIPE_VERSION", "FeatureExtractor", "FeatureNet",
           "FeatureNetConfig", "TrainingReport", "load_feature_net", "save_feature_net", "train_feature_classifier"]
