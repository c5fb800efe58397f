"""Sample-quality evaluation for generative models: FID/FD, Inception Score, and k-NN precision/recall."""

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
from .metrics import PrecisionRecall, frechet_distance, inception_score, precision_recall
from .pipeline_evaluation import (
    build_feature_extractor,
    class_labels_for_samples,
    evaluate_pipeline,
    extractor_input_channels,
    load_module_file,
    match_channels,
    quantize_images,
    sample_generator,
    save_images,
)
from .reference import compute_reference_statistics, iterate_image_batches
from .statistics import FeatureReservoir, FeatureStatistics, gather_statistics


__all__ = [
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FeatureExtractor",
    "FeatureExtractorOutput",
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
    "frechet_distance",
    "gather_statistics",
    "images_to_unit_range",
    "inception_score",
    "iterate_image_batches",
    "load_module_file",
    "match_channels",
    "precision_recall",
    "quantize_images",
    "sample_generator",
    "save_images",
]
