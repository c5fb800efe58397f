"""Training DiffiT with accelerate: data loading, cached latents, objectives, the training loop and its command line."""

from .data import (
    DIGITS_DATASET_NAME,
    DataConfig,
    EpochSampler,
    ImageDataset,
    ImageTransform,
    ResumableLoader,
    StreamingImageDataset,
    UNREADABLE_IMAGE_ERRORS,
    collate_examples,
    decode_and_transform,
    load_digits_dataset,
    load_training_dataset,
    normalize_pixels,
)
from .objectives import OBJECTIVES, DDPMObjective, EDMObjective, LearnedSigmaObjective, build_objective
from .config import TrainingConfig, TrainingOptions, parse_config
from .trainer import Trainer, build_adamw, train
from .latents import LatentDataset, StreamingLatentDataset, load_latents_dataset, read_latents_info
from .precompute_latents import LatentCachingOptions, compute_latents_dataset


__all__ = [
    "DIGITS_DATASET_NAME",
    "DataConfig",
    "EpochSampler",
    "ImageDataset",
    "ImageTransform",
    "ResumableLoader",
    "StreamingImageDataset",
    "UNREADABLE_IMAGE_ERRORS",
    "collate_examples",
    "decode_and_transform",
    "load_digits_dataset",
    "load_training_dataset",
    "normalize_pixels",
    "OBJECTIVES",
    "DDPMObjective",
    "EDMObjective",
    "LearnedSigmaObjective",
    "build_objective",
    "TrainingConfig",
    "TrainingOptions",
    "build_adamw",
    "parse_config",
    "Trainer",
    "train",
    "LatentDataset",
    "StreamingLatentDataset",
    "load_latents_dataset",
    "read_latents_info",
    "LatentCachingOptions",
    "compute_latents_dataset",
]
