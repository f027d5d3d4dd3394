"""Metrics (docs/architecture.md#metrics): quality (FD/KD in classifier feature space), information disclosure,
and the pure-metric half of the reconstruction attack.

The feature extractor is a small classifier trained by the project on the dataset itself
(:func:`get_feature_net`), or a user-supplied network file (:func:`load_feature_extractor`).
"""
from .disclosure import DisclosureScores, ReconstructionScores, disclosure_scores, reconstruction_scores
from .distances import (FeatureStats, KernelDistance, NearestNeighbours, feature_stats, frechet_distance,
                        frechet_distance_from_stats, kernel_distance, mse, nearest_neighbour_distance,
                        nearest_neighbours, per_sample_mse, per_sample_psnr, psnr)
from .extractors import TorchScriptFeatures, dataset_key, get_feature_net, load_feature_extractor
from .features import FeatureExtractor, FeatureNet, FeatureNetConfig, TrainingReport, train_feature_classifier
from .quality import QualityScores, quality_scores

__all__ = [
    "DisclosureScores", "FeatureExtractor", "FeatureNet", "FeatureNetConfig", "FeatureStats", "KernelDistance",
    "NearestNeighbours", "QualityScores", "ReconstructionScores", "TorchScriptFeatures", "TrainingReport",
    "dataset_key", "disclosure_scores", "feature_stats", "frechet_distance", "frechet_distance_from_stats",
    "get_feature_net", "kernel_distance", "load_feature_extractor", "mse", "nearest_neighbour_distance",
    "nearest_neighbours", "per_sample_mse", "per_sample_psnr", "psnr", "quality_scores",
    "reconstruction_scores", "train_feature_classifier",
]
