"""Training options: one dataclass, and the command-line parser generated from it."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .objectives import OBJECTIVES


def option(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainingConfig:
    """Everything a DiffiT training run needs; ``examples/train_diffit.py`` and ``train_latent_diffit.py`` expose
    each field as a ``--flag``."""

    # Data
    dataset_name: str | None = option(None, "Hub dataset id, local dataset path, or 'digits' (built in, offline)")
    dataset_config_name: str | None = option(None, "configuration of a Hub dataset")
    split: str = option("train", "dataset split to train on")
    train_data_dir: str | None = option(None, "image folder; class sub-folders become labels")
    image_column: str = option("image", "column holding the images")
    label_column: str | None = option(None, "column holding class labels; omit for unconditional training")
    resolution: int = option(32, "side of the square training images (pixels)")
    center_crop: bool = option(True, "center crop after resizing (else a random crop)")
    random_flip: bool = option(False, "random horizontal flips")
    num_channels: int = option(3, "3 = RGB, 1 = grayscale")
    streaming: bool = option(False, "stream the dataset instead of downloading it")
    shuffle_buffer_size: int = option(1000, "shuffle buffer of a streamed dataset")
    max_train_samples: int | None = option(None, "train on at most this many examples")
    cache_dir: str | None = option(None, "datasets/Hub cache folder")
    # Model and objective
    model_config: str = option("tiny", "preset name (e.g. tiny, cifar10-32, DiffiT-B/2) or a config.json / folder")
    objective: str = option("edm", "training objective", choices=OBJECTIVES)
    class_dropout_prob: float | None = option(None, "label dropout for classifier-free guidance (default: preset's)")
    vae: str | None = option(None, "AutoencoderKL folder or Hub id: train in its latent space")
    # Optimisation
    output_dir: str = option("diffit-output", "where checkpoints, logs and the final pipeline go")
    seed: int = option(0, "random seed")
    train_batch_size: int = option(16, "batch size per process")
    max_train_steps: int = option(1000, "optimiser steps")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimiser step")
    learning_rate: float = option(1e-4, "peak learning rate")
    lr_scheduler: str = option("constant", "diffusers.optimization scheduler name (constant, cosine, linear, ...)")
    lr_warmup_steps: int = option(0, "warm-up steps of the learning rate")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(0.0, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    cpu: bool = option(False, "train on the CPU even when a GPU is available")
    mixed_precision: str = option("no", "mixed precision mode", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    use_ema: bool = option(True, "keep an exponential moving average of the weights")
    ema_decay: float = option(0.9999, "EMA decay")
    ema_warmup: bool = option(True, "EMA warm-up (decay grows from 0 towards ema_decay)")
    # Checkpoints, validation, logging
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder to resume from")
    validation_steps: int = option(0, "sample a validation grid every N steps (0 disables)")
    num_validation_images: int = option(4, "validation images per class (or in total when unconditional)")
    guidance_scale: float = option(2.0, "guidance scale of validation and card samples (class-conditional)")
    num_inference_steps: int = option(32, "sampler steps of validation and card samples")
    report_to: str = option("none", "experiment tracker", choices=("none", "tensorboard"))
    logging_steps: int = option(10, "log the loss every N steps")
    # Hub
    push_to_hub: bool = option(False, "push the EMA pipeline with a model card at every checkpoint and the end")
    hub_model_id: str | None = option(None, "Hub repo id (default: the output folder's name)")
    hub_token: str | None = option(None, "Hub token (default: the logged-in one)")
    hub_private_repo: bool = option(False, "create the Hub repo as private")
    hub_push_training_state: bool = option(False, "also push optimizer/RNG state, under training_state/")

    def __post_init__(self):
        positive = ("resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps")
        for name in positive + ("checkpointing_steps", "logging_steps", "num_validation_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.validation_steps < 0:
            raise ValueError(f"`validation_steps` must be >= 0, got {self.validation_steps}.")
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be positive, got {self.learning_rate}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"`checkpoints_total_limit` must be >= 1, got {self.checkpoints_total_limit}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {self.ema_decay}.")
        if self.hub_push_training_state and not self.push_to_hub:
            raise ValueError("`hub_push_training_state` needs `push_to_hub`.")


def build_parser(description: str, defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """A ``--flag`` per ``TrainingConfig`` field; booleans take ``--flag`` / ``--no-flag``."""
    parser = argparse.ArgumentParser(description=description)
    defaults = defaults or {}
    for spec in dataclasses.fields(TrainingConfig):
        default = defaults.get(spec.name, spec.default)
        kwargs: dict[str, Any] = {"default": default, "help": f"{spec.metadata['help']} (default: {default})"}
        annotation = spec.type
        if annotation == "bool":
            parser.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        if annotation.startswith("int"):
            kwargs["type"] = int
        elif annotation.startswith("float"):
            kwargs["type"] = float
        parser.add_argument(f"--{spec.name}", **kwargs)
    return parser


def parse_config(argv: list[str] | None, description: str, defaults: dict[str, Any] | None = None) -> TrainingConfig:
    """Parse command-line flags into a ``TrainingConfig``; invalid values exit with argparse's usage message."""
    parser = build_parser(description, defaults)
    args = parser.parse_args(argv)
    try:
        return TrainingConfig(**vars(args))
    except ValueError as error:
        parser.error(str(error))
