"""LoRA fine-tuning of a trained DiffiT pipeline with accelerate (behind ``examples/train_diffit_lora.py``).

The base pipeline's denoiser is frozen and PEFT LoRA layers are added to its TMSA projections, feed-forward layers
and, for class-conditional models, its class table. Data, objective, optimiser, checkpoints, validation and Hub
pushes are the full trainer's (:class:`~diffit_diffusers.training.Trainer`); only the model and the saved result
differ. Classes the base model does not have (dataset labels ``>= num_classes``) are added with
``grow_class_embedding`` and learnt through the class-table LoRA, so the result is one standard LoRA file that
``DiffiTPipeline.load_lora_weights`` loads into the unchanged base pipeline.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import HfArgumentParser

from ..dataset_sources import looks_like_local_path
from ..hub import create_model_card
from ..models import DiffiTTransformer2DModel, grow_class_embedding
from ..models.class_embedding import CLASS_EMBEDDING_TABLE
from ..pipelines import DiffiTPipeline
from .cli import run_trainer
from .config import TrainingConfig, parse_config
from .trainer import Trainer, sample_grid


#: TMSA projections as separate layers, the fused layers of older models, and the feed-forward layers.
SEPARATE_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "time_to_q", "time_to_k", "time_to_v")
FUSED_ATTENTION_TARGETS = ("to_qkv", "time_to_qkv")
OUTPUT_AND_FEED_FORWARD_TARGETS = ("to_out", "ff.net.0.proj", "ff.net.2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_DEFAULTS: dict[str, Any] = {"output_dir": "diffit-lora", "use_ema": False, "learning_rate": 1e-4}
DESCRIPTION = "Fine-tune LoRA layers on a trained DiffiT pipeline with accelerate."


def default_lora_target_modules(denoiser: nn.Module, train_class_embedding: bool = True) -> list[str]:
    """The layers a DiffiT LoRA adapts: every TMSA projection the model has (``to_q``/``to_k``/``to_v`` and
    ``time_to_q``/``time_to_k``/``time_to_v``, or their fused ``to_qkv``/``time_to_qkv``), ``to_out``, the
    feed-forward ``ff.net.0.proj`` and ``ff.net.2`` and, for a class-conditional model, the class table."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in denoiser.named_modules()}
    attention = [name for name in SEPARATE_ATTENTION_TARGETS + FUSED_ATTENTION_TARGETS if name in leaf_names]
    targets = attention + list(OUTPUT_AND_FEED_FORWARD_TARGETS)
    if train_class_embedding and denoiser.config.num_classes is not None:
        targets.append(CLASS_EMBEDDING_TABLE)
    return targets


@dataclass
class LoraArguments:
    """The LoRA part of a fine-tuning run; the data, objective and optimiser options are ``TrainingConfig``'s."""

    pretrained_model_name_or_path: str = field(
        metadata={"help": "base DiffiTPipeline: a saved folder or Hub repo id (replaces --model_config)"}
    )
    revision: str | None = field(default=None, metadata={"help": "revision of a Hub base pipeline"})
    lora_rank: int = field(default=16, metadata={"help": "rank r of the LoRA layers"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha, the LoRA scale being alpha / r; unset means r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path"})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "comma-separated layer names to adapt (default: attention, feed-forward, class table)"},
    )
    train_class_embedding: bool = field(
        default=True, metadata={"help": "adapt the class table (needed to learn classes the base model lacks)"}
    )

    def __post_init__(self):
        if self.lora_rank < 1:
            raise ValueError(f"`lora_rank` must be a positive integer, got {self.lora_rank}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be positive, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}.")

    def lora_config(self, denoiser: nn.Module) -> LoraConfig:
        """The PEFT ``LoraConfig`` for ``denoiser`` (zero-initialised up-projections: training starts at the base)."""
        if self.lora_target_modules:
            targets = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        else:
            targets = default_lora_target_modules(denoiser, self.train_class_embedding)
        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha or self.lora_rank,
            lora_dropout=self.lora_dropout,
            target_modules=targets,
        )


def resolve_base_folder(lora_args: LoraArguments, cache_dir: str | None = None) -> Path:
    """The base pipeline as a local folder: the folder itself, or the Hub repo's snapshot (downloaded or cached)."""
    path = Path(lora_args.pretrained_model_name_or_path).expanduser()
    if path.is_dir():
        return path
    if looks_like_local_path(lora_args.pretrained_model_name_or_path):
        raise FileNotFoundError(
            f"The base pipeline folder {str(path)!r} does not exist; pass a saved DiffiTPipeline folder or a Hub id."
        )
    return Path(
        snapshot_download(lora_args.pretrained_model_name_or_path, revision=lora_args.revision, cache_dir=cache_dir)
    )


class LoraTrainer(Trainer):
    """Fine-tunes LoRA layers on a frozen base DiffiT denoiser; saves the LoRA weights with a model card.

    Args:
        config: data, objective, optimiser, checkpoint and Hub options (``model_config`` is not used).
        lora_args: the base pipeline and the LoRA layers.
    """

    def __init__(self, config: TrainingConfig, lora_args: LoraArguments):
        self.lora_args = lora_args
        base_folder = resolve_base_folder(lora_args, config.data.cache_dir)
        self.base_pipeline = DiffiTPipeline.from_pretrained(base_folder)
        if config.vae is None and self.base_pipeline.vae is not None:
            config = dataclasses.replace(config, vae=str(base_folder / "vae"))
        super().__init__(config)

    def build_denoiser(self, *, num_classes: int | None, in_channels: int, sample_size: int) -> nn.Module:
        """The base denoiser, frozen, with the data's new classes added and LoRA layers attached."""
        denoiser = self.base_pipeline.denoiser
        base = denoiser.config
        if in_channels != base.in_channels:
            raise ValueError(
                f"The training data has {in_channels} channels but the base denoiser takes {base.in_channels}; set "
                f"--num_channels (or --vae) to match the base pipeline."
            )
        if isinstance(denoiser, DiffiTTransformer2DModel) and sample_size != base.sample_size:
            raise ValueError(
                f"The training data gives {sample_size}x{sample_size} latents but the base transformer takes "
                f"{base.sample_size}x{base.sample_size}; set --resolution to match the base pipeline."
            )
        if base.num_classes is None and num_classes is not None:
            raise ValueError("The base denoiser is unconditional; drop --label_column to fine-tune it without labels.")
        if base.num_classes is not None and num_classes is None:
            raise ValueError("The base denoiser is class-conditional; pass --label_column with the dataset's labels.")
        if num_classes is not None and num_classes > base.num_classes:
            if not self.lora_args.train_class_embedding:
                raise ValueError(
                    f"The data has {num_classes} classes, more than the base's {base.num_classes}: new classes need "
                    "--train_class_embedding."
                )
            grow_class_embedding(denoiser, num_classes)
        denoiser.requires_grad_(False)
        denoiser.add_adapter(self.lora_args.lora_config(denoiser))
        return denoiser

    def training_summary(self) -> dict[str, Any]:
        model = self.unwrapped_model
        lora = model.peft_config["default"]
        return {
            **super().training_summary(),
            "base model": self.lora_args.pretrained_model_name_or_path,
            "LoRA rank": lora.r,
            "LoRA alpha": lora.lora_alpha,
            "LoRA layers": ", ".join(sorted(lora.target_modules)),
            "trainable parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }

    def _usage_snippet(self, source: str) -> str:
        base = self.lora_args.pretrained_model_name_or_path
        label = "class_labels=[0]" if self.unwrapped_model.config.num_classes is not None else ""
        return (
            "from diffit_diffusers import DiffiTPipeline\n\n"
            f'pipeline = DiffiTPipeline.from_pretrained("{base}")\n'
            f'pipeline.load_lora_weights("{source}")\n'
            f"image = pipeline({label}).images[0]"
        )

    def export_pipeline(self, folder: Path) -> Path:
        """Save the (EMA) LoRA weights of the denoiser with a LoRA model card and a sample grid in ``folder``."""

        def export():
            model = self.unwrapped_model
            pipeline = self.build_pipeline()
            pipeline.set_progress_bar_config(disable=True)
            DiffiTPipeline.save_lora_weights(
                folder,
                denoiser_lora_layers=get_peft_model_state_dict(model),
                denoiser_lora_adapter_metadata=model.peft_config["default"].to_dict(),
                weight_name=LORA_WEIGHT_NAME,
            )
            images, _ = sample_grid(pipeline, self.config, seed=self.config.seed)
            repo_id = self.uploads.resolved_repo_id() if self.uploads is not None else None
            base = self.lora_args.pretrained_model_name_or_path
            create_model_card(
                folder,
                repo_id=repo_id,
                base_model=None if Path(base).expanduser().is_dir() else base,
                datasets=[self.config.data.dataset_name] if self.config.data.dataset_name else None,
                tags=["lora", "class-conditional" if pipeline.num_classes else "unconditional", self.objective.name],
                sample_images=images,
                training_summary=self.training_summary(),
                usage_snippet=self._usage_snippet(repo_id or Path(folder).as_posix()),
                extra_text=(
                    "## LoRA\n\nThese are LoRA weights (`" + LORA_WEIGHT_NAME + "`) for the base DiffiT pipeline "
                    f"`{base}`, not a full pipeline: load the base, then `load_lora_weights`."
                ),
            )

        self._with_ema_weights(export)
        return folder


def train_lora(config: TrainingConfig, lora_args: LoraArguments) -> Path:
    """Run a LoRA fine-tuning job; returns the folder holding the LoRA weights and card."""
    return LoraTrainer(config, lora_args).train()


def parse_lora_config(argv: list[str] | None = None) -> tuple[TrainingConfig, LoraArguments]:
    """Parse the command line of ``examples/train_diffit_lora.py``: the ``LoraArguments`` flags, then every flag
    of the full trainer (``parse_config``: data, objective, optimiser, ``--config`` file). Invalid values exit with
    the usage message; ``--help`` lists both groups."""
    argv = sys.argv[1:] if argv is None else list(argv)
    lora_parser = HfArgumentParser(LoraArguments, add_help=False, usage="LoRA options")
    if "-h" in argv or "--help" in argv:
        print(lora_parser.format_help())
        parse_config(["--help"], DESCRIPTION, LORA_DEFAULTS)
    try:
        lora_args, remaining = lora_parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:
        lora_parser.error(str(error))
    return parse_config(remaining, DESCRIPTION, LORA_DEFAULTS), lora_args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit statuses as ``diffit_diffusers.training.cli`` (0 saved, 1 error, 2 bad flags,
    3 final Hub push failed)."""
    config, lora_args = parse_lora_config(argv)
    return run_trainer(lambda: LoraTrainer(config, lora_args), "the LoRA weights")
