"""Training options: one nested dataclass (data + training), parsed from flags and YAML/JSON files by transformers'
``HfArgumentParser``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .data import DataConfig, _option as option
from .objectives import OBJECTIVES


@dataclass
class TrainingOptions:
    """The options of a training run other than its data (see ``TrainingConfig``)."""

    # Model and objective
    model_config: str = option("tiny", "preset name (e.g. tiny, cifar10-32, DiffiT-B/2) or a config.json / folder")
    objective: str = option("edm", "training objective", choices=OBJECTIVES)
    class_dropout_prob: float | None = option(None, "label dropout for classifier-free guidance (default: preset's)")
    vae: str | None = option(None, "AutoencoderKL folder or Hub id: train in its latent space")
    # Optimisation
    output_dir: str = option("diffit-output", "where checkpoints, logs and the final pipeline go")
    overwrite_output_dir: bool = option(False, "start afresh in an output folder that holds another run (deletes its checkpoints)")
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
    activation_recomputation: str = option(
        "model",
        "recompute norm and activation outputs in backward: 'model' keeps the model's default (on for the U-Net, off "
        "for the latent model), 'on' or 'off'",
        choices=("model", "on", "off"),
    )
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
        positive = ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps")
        for name in positive + ("logging_steps", "num_validation_images", "num_inference_steps"):
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


@dataclass
class TrainingConfig(TrainingOptions):
    """Everything a DiffiT training run needs: `data` (a [`DataConfig`][diffit_diffusers.training.DataConfig]) and
    the training options. ``examples/train_diffit.py`` and ``train_latent_diffit.py`` expose every field of both as a
    ``--flag`` (see ``parse_config``).

    Example:
        ```py
        config = TrainingConfig(data=DataConfig(dataset_name="digits", resolution=8), max_train_steps=100)
        ```
    """

    data: DataConfig = field(default=None, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.data, DataConfig):
            raise TypeError(f"`data` must be a DataConfig, got {type(self.data).__name__}.")

    @property
    def seed(self) -> int:
        """The run's seed (``data.seed``): data order, crops and flips, initialisation and noise."""
        return self.data.seed

    def options(self) -> dict[str, Any]:
        """Every option as one flat mapping (data fields and training fields), e.g. for experiment trackers."""
        flat = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(TrainingOptions)}
        return {**dataclasses.asdict(self.data), **flat}


def build_parser(description: str, defaults: dict[str, Any] | None = None) -> HfArgumentParser:
    """An ``HfArgumentParser`` with a ``--flag`` per ``DataConfig`` and ``TrainingOptions`` field (booleans take
    ``--flag``, ``--flag false`` or ``--no_flag``) and ``--config file.yaml|json`` whose values the flags override."""
    parser = HfArgumentParser((DataConfig, TrainingOptions), description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; flags given as well win")
    parser.set_defaults(**(defaults or {}))
    return parser


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The options of a YAML or JSON file, checked against the flags the parser knows."""
    file = Path(path)
    if not file.is_file():
        parser.error(f"--config {path!r} does not exist.")
    values = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    if not isinstance(values, dict):
        parser.error(f"--config {path!r} must hold a mapping of option names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path!r} has unknown options {unknown}; `--help` lists them.")
    return values


def parse_config(argv: list[str] | None, description: str, defaults: dict[str, Any] | None = None) -> TrainingConfig:
    """Parse flags (and a ``--config`` file) into a ``TrainingConfig``; invalid values exit with the usage message.

    Precedence, lowest first: the dataclass defaults, ``defaults`` (per script), the ``--config`` file, the flags.
    """
    parser = build_parser(description, defaults)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_config_file(known.config, parser))
    try:
        data, options, _ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
        return TrainingConfig(data=data, **{spec.name: getattr(options, spec.name) for spec in dataclasses.fields(options)})
    except ValueError as error:
        parser.error(str(error))
