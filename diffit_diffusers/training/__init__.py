"""Training DiffiT with accelerate: data loading, objectives, the training loop and its command line."""

from .data import (
    DIGITS_DATASET_NAME,
    DataConfig,
    EpochSampler,
    ImageDataset,
    ImageTransform,
    ResumableLoader,
    StreamingImageDataset,
    collate_examples,
    load_digits_dataset,
    load_training_dataset,
)
from .objectives import OBJECTIVES, DDPMObjective, EDMObjective, LearnedSigmaObjective, build_objective
from .config import TrainingConfig, TrainingOptions, parse_config
from .trainer import Trainer, train


__all__ = [
    "DIGITS_DATASET_NAME",
    "DataConfig",
    "EpochSampler",
    "ImageDataset",
    "ImageTransform",
    "ResumableLoader",
    "StreamingImageDataset",
    "collate_examples",
    "load_digits_dataset",
    "load_training_dataset",
    "OBJECTIVES",
    "DDPMObjective",
    "EDMObjective",
    "LearnedSigmaObjective",
    "build_objective",
    "TrainingConfig",
    "TrainingOptions",
    "parse_config",
    "Trainer",
    "train",
]
