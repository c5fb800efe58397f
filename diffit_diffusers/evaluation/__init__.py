"""Sample-quality evaluation for generative models: FID/FD, KID and Inception Score by torchmetrics, and k-NN
precision/recall."""

from .evaluate import evaluate_samples
from .feature_extractors import (
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FeatureExtractor,
    FeatureExtractorOutput,
    InceptionFeatureExtractor,
    ModuleFeatureExtractor,
    images_to_unit_range,
)
from .metrics import PrecisionRecall, inception_score, kernel_inception_distance, precision_recall
from .pipeline_evaluation import (
    build_feature_extractor,
    class_labels_for_samples,
    evaluate_pipeline,
    extractor_input_channels,
    load_module_file,
    match_channels,
    quantize_images,
    save_images,
)
from .reference import compute_reference_statistics, iterate_image_batches
from .statistics import FeatureInput, FeatureReservoir, FeatureStatistics, frechet_distance_metric


__all__ = [
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "FeatureExtractorOutput",
    "FeatureInput",
    "FeatureReservoir",
    "FeatureStatistics",
    "InceptionFeatureExtractor",
    "ModuleFeatureExtractor",
    "PrecisionRecall",
    "build_feature_extractor",
    "class_labels_for_samples",
    "compute_reference_statistics",
    "evaluate_pipeline",
    "evaluate_samples",
    "extractor_input_channels",
    "frechet_distance_metric",
    "images_to_unit_range",
    "inception_score",
    "iterate_image_batches",
    "kernel_inception_distance",
    "load_module_file",
    "match_channels",
    "precision_recall",
    "quantize_images",
    "save_images",
]
