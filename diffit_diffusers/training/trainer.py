"""The DiffiT training loop on ``accelerate``: one CPU to many GPUs, exact resume, EMA, validation and Hub pushes."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, ModelMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from ..hub import BackgroundHubUploader, create_model_card, resolve_hub_repo_id
from ..models import DiffiTTransformer2DModel, DiffiTUNet2DModel
from ..models.denoiser import DiffiTDenoiserMixin, denoiser_class
from ..pipelines import DiffiTPipeline
from ..presets import load_preset_config
from .config import TrainingConfig
from .data import DataConfig, ResumableLoader, load_training_dataset
from .objectives import build_objective


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
HUB_EXPORT_DIR = "hub-export"


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (else accelerate must be told to run on CPU, also when it
    launches several CPU processes)."""
    current = getattr(getattr(torch, "accelerator", None), "current_accelerator", None)
    if current is not None:
        return current() is not None
    return torch.cuda.is_available()


def data_config_from(config: TrainingConfig) -> DataConfig:
    """The data part of a training config."""
    return DataConfig(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        split=config.split,
        train_data_dir=config.train_data_dir,
        image_column=config.image_column,
        label_column=config.label_column,
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        num_channels=config.num_channels,
        streaming=config.streaming,
        shuffle_buffer_size=config.shuffle_buffer_size,
        seed=config.seed,
        max_train_samples=config.max_train_samples,
        cache_dir=config.cache_dir,
    )


def load_model_config(name_or_path: str) -> dict[str, Any]:
    """A model config from a preset name, a ``config.json`` file or a folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"Model config {str(path)!r} does not exist.")
        return json.loads(path.read_text())
    return load_preset_config(name_or_path)


def build_denoiser(
    config: TrainingConfig, *, num_classes: int | None, in_channels: int, sample_size: int
) -> DiffiTUNet2DModel | DiffiTTransformer2DModel:
    """A freshly initialised denoiser for this data: the model config with the data's sizes and classes and the
    objective's parameterization (which also sets ``learn_sigma``)."""
    model_config = load_model_config(config.model_config)
    model_cls = denoiser_class(model_config.get("_class_name"), source=f"Model config {config.model_config!r}")
    overrides: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": None,
        "num_classes": num_classes,
        **build_objective(config.objective).parameterization.to_config(),
    }
    if config.class_dropout_prob is not None:
        overrides["class_dropout_prob"] = config.class_dropout_prob
    return model_cls.from_config({**model_config, **overrides})


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(output_dir: Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (``None`` when there is none yet) or an explicit folder."""
    if resume_from_checkpoint == "latest":
        checkpoints = find_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a training checkpoint (no {TRAINING_STATE_FILE}); pass 'latest' or a "
            f"checkpoint-N folder from a previous run."
        )
    return path


def copy_pipeline_folder(source: Path, destination: Path) -> Path:
    """Copy only the pipeline of ``source`` (components from ``model_index.json``, card, sample grid, loader
    modules) to ``destination``, leaving checkpoints and logs behind."""
    index = json.loads((source / DiffiTPipeline.config_name).read_text())
    keep = {DiffiTPipeline.config_name, "README.md", "samples.png"}
    keep |= {name for name, value in index.items() if isinstance(value, list) and value[0] and not name.startswith("_")}
    keep |= {path.name for path in source.glob("*.py")}
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for name in keep:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, destination / name)
        elif item.is_file():
            shutil.copy2(item, destination / name)
    return destination


def sample_grid(pipeline: DiffiTPipeline, config: TrainingConfig, *, seed: int) -> tuple[list, int]:
    """Images for a validation grid: ``num_validation_images`` per class (a row each, at most 10 classes) or in
    total (one row). Returns the PIL images and the number of grid rows."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    num_classes = pipeline.num_classes
    if num_classes is None:
        images = pipeline(
            batch_size=config.num_validation_images, num_inference_steps=config.num_inference_steps, generator=generator
        ).images
        return images, 1
    labels = list(range(min(num_classes, 10)))
    guidance = config.guidance_scale if pipeline.null_class_id is not None else 1.0
    images = pipeline(
        class_labels=labels,
        num_images_per_prompt=config.num_validation_images,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=guidance,
        generator=generator,
    ).images
    return images, len(labels)


class Trainer:
    """Runs one training job described by a ``TrainingConfig`` (see ``train``)."""

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            cpu=config.cpu or not has_accelerator(),
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
        )
        set_seed(config.seed, device_specific=True)
        self.skipped_images = 0
        dataset = load_training_dataset(
            data_config_from(config),
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            on_unreadable_image=self._count_unreadable,
        )
        self.dataset = dataset
        self.loader = ResumableLoader(dataset, config.train_batch_size)

        self.vae = None
        in_channels, sample_size = config.num_channels, config.resolution
        if config.vae is not None:
            self.vae = AutoencoderKL.from_pretrained(config.vae).requires_grad_(False).eval()
            self.vae.to(self.accelerator.device)
            downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            if config.resolution % downscale:
                raise ValueError(
                    f"`resolution` ({config.resolution}) must be divisible by the VAE's downscale factor {downscale}."
                )
            in_channels, sample_size = self.vae.config.latent_channels, config.resolution // downscale
        self.objective = build_objective(config.objective)
        model = self.build_denoiser(num_classes=dataset.num_classes, in_channels=in_channels, sample_size=sample_size)
        if not isinstance(model, DiffiTDenoiserMixin):
            raise ValueError(
                f"`build_denoiser` returned a {type(model).__name__}; the trainer needs a model with the "
                "`DiffiTDenoiserMixin` interface (diffit_diffusers.models.denoiser)."
            )
        model.register_to_config(**self.objective.parameterization.to_config())
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        num_processes = self.accelerator.num_processes
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * num_processes,
            num_training_steps=config.max_train_steps * num_processes,
        )
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, optimizer, lr_scheduler)
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(
                self.unwrapped_model.parameters(),
                decay=config.ema_decay,
                use_ema_warmup=config.ema_warmup,
                model_cls=type(self.unwrapped_model),
                model_config=self.unwrapped_model.config,
            )
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.global_step = 0
        self.uploader = None
        if config.push_to_hub and self.accelerator.is_main_process:
            self.uploader = BackgroundHubUploader(
                resolve_hub_repo_id(config.hub_model_id or self.output_dir.resolve().name, config.hub_token),
                token=config.hub_token,
                private=config.hub_private_repo,
            )

    def build_denoiser(self, *, num_classes: int | None, in_channels: int, sample_size: int) -> ModelMixin:
        """The freshly initialised denoiser, from ``config.model_config`` (see ``build_denoiser``). Override it to
        train another ``ModelMixin`` with the ``DiffiTDenoiserMixin`` interface and ``config.in_channels`` and
        ``config.sample_size``; the trainer writes the objective's parameterization into its config."""
        return build_denoiser(self.config, num_classes=num_classes, in_channels=in_channels, sample_size=sample_size)

    def _count_unreadable(self, description: str, error: Exception) -> None:
        self.skipped_images += 1

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    # Checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a resumable checkpoint (model, EMA, optimizer, LR schedule, RNG, data position, step)."""
        checkpoint = self.output_dir / f"checkpoint-{self.global_step}"
        if self.accelerator.is_main_process and self.config.checkpoints_total_limit is not None:
            existing = find_checkpoints(self.output_dir)
            for old in existing[: max(len(existing) - self.config.checkpoints_total_limit + 1, 0)]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(checkpoint))
        rank = self.accelerator.process_index
        (checkpoint / f"data_state_{rank}.json").write_text(json.dumps(self.loader.state_dict()))
        if self.accelerator.is_main_process:
            state = {"global_step": self.global_step, "num_processes": self.accelerator.num_processes}
            (checkpoint / TRAINING_STATE_FILE).write_text(json.dumps(state))
        self.accelerator.wait_for_everyone()
        logger.info("Saved checkpoint %s", checkpoint)
        return checkpoint

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore everything ``save_checkpoint`` wrote."""
        state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{checkpoint} was saved by {state['num_processes']} process(es) but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        self.accelerator.load_state(str(checkpoint))
        data_state = checkpoint / f"data_state_{self.accelerator.process_index}.json"
        self.loader.load_state_dict(json.loads(data_state.read_text()))
        self.global_step = state["global_step"]
        logger.info("Resumed from %s at step %d", checkpoint, self.global_step)

    # Pipelines, validation and the Hub --------------------------------------------------------------------------
    def build_pipeline(self) -> DiffiTPipeline:
        """A sampling pipeline around the current model (callers swap the EMA weights in first)."""
        return DiffiTPipeline(
            denoiser=self.unwrapped_model,
            scheduler=self.objective.make_scheduler(),
            vae=self.vae,
            id2label=self.dataset.id2label,
            default_num_inference_steps=self.config.num_inference_steps,
            default_guidance_scale=self.config.guidance_scale if self.unwrapped_model.null_class_id is not None else 1.0,
        )

    def _with_ema_weights(self, fn):
        model = self.unwrapped_model
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        model.eval()
        try:
            return fn()
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(model.parameters())

    def export_pipeline(self, folder: Path) -> Path:
        """Save the EMA weights as a complete ``DiffiTPipeline`` folder with a model card and a sample grid."""

        def export():
            pipeline = self.build_pipeline()
            pipeline.set_progress_bar_config(disable=True)
            pipeline.save_pretrained(folder)
            images, _ = sample_grid(pipeline, self.config, seed=self.config.seed)
            create_model_card(
                folder,
                repo_id=self.config.hub_model_id if self.config.push_to_hub else None,
                datasets=[self.config.dataset_name] if self.config.dataset_name else None,
                tags=["class-conditional" if pipeline.num_classes else "unconditional", self.objective.name],
                sample_images=images,
                training_summary=self.training_summary(),
                config=dict(self.unwrapped_model.config),
            )

        self._with_ema_weights(export)
        return folder

    def training_summary(self) -> dict[str, Any]:
        config = self.config
        return {
            "dataset": config.dataset_name or config.train_data_dir,
            "resolution": config.resolution,
            "objective": config.objective,
            "steps": self.global_step,
            "batch size (total)": config.train_batch_size
            * self.accelerator.num_processes
            * config.gradient_accumulation_steps,
            "learning rate": config.learning_rate,
            "EMA decay": config.ema_decay if config.use_ema else "off",
            "mixed precision": config.mixed_precision,
            "parameters": sum(p.numel() for p in self.unwrapped_model.parameters()),
        }

    def validate(self) -> Path:
        """Sample a labelled validation grid with the EMA weights, save it as PNG and log it."""

        def run():
            pipeline = self.build_pipeline()
            pipeline.set_progress_bar_config(disable=True)
            return sample_grid(pipeline, self.config, seed=self.config.seed)

        images, rows = self._with_ema_weights(run)
        grid = make_image_grid(images, rows=rows, cols=len(images) // rows)
        path = self.output_dir / "validation" / f"step-{self.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.asarray(grid)[None]}, step=self.global_step, dataformats="NHWC")
        return path

    def push_checkpoint(self, checkpoint: Path) -> None:
        """Queue the EMA pipeline (and optionally the training state) for a background upload."""
        folder = self.export_pipeline(self.output_dir / HUB_EXPORT_DIR)
        self.uploader.submit(folder, commit_message=f"Step {self.global_step}")
        if self.config.hub_push_training_state:
            self.uploader.submit(
                checkpoint,
                path_in_repo=f"training_state/{checkpoint.name}",
                commit_message=f"Training state at step {self.global_step}",
            )

    # The loop ---------------------------------------------------------------------------------------------------
    def training_step(self) -> torch.Tensor:
        batch = self.loader.next_batch()
        clean = batch["pixel_values"].to(self.accelerator.device)
        if self.vae is not None:
            with torch.no_grad():
                posterior = self.vae.encode(clean.to(self.vae.dtype)).latent_dist
                clean = posterior.sample() * self.vae.config.scaling_factor
        labels = batch.get("class_labels")
        if labels is not None:
            labels = labels.to(self.accelerator.device)
        return self.objective.loss(self.model, clean, labels)

    def train(self) -> Path:
        """Train to ``max_train_steps`` and save the final EMA pipeline in ``output_dir``; returns that folder."""
        config, accelerator = self.config, self.accelerator
        if config.resume_from_checkpoint:
            checkpoint = resolve_resume_checkpoint(self.output_dir, config.resume_from_checkpoint)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
        if accelerator.is_main_process:
            accelerator.init_trackers("diffit", config={k: v for k, v in vars(config).items() if v is not None})
        images_per_step = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.global_step,
            desc="Training",
            disable=not accelerator.is_local_main_process,
        )
        step_started = time.perf_counter()
        while self.global_step < config.max_train_steps:
            with accelerator.accumulate(self.model):
                loss = self.training_step()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if self.ema is not None:
                self.ema.step(self.unwrapped_model.parameters())
            self.global_step += 1
            elapsed = time.perf_counter() - step_started
            step_started = time.perf_counter()
            logs = {
                "loss": loss.detach().item(),
                "lr": self.lr_scheduler.get_last_lr()[0],
                "images_per_sec": images_per_step / max(elapsed, 1e-9),
            }
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_sec']:.1f}")
            if self.global_step % config.logging_steps == 0:
                logs["skipped_images"] = self.skipped_images
                accelerator.log(logs, step=self.global_step)
            if self.global_step % config.checkpointing_steps == 0:
                checkpoint = self.save_checkpoint()
                if self.uploader is not None:
                    self.push_checkpoint(checkpoint)
            if config.validation_steps and self.global_step % config.validation_steps == 0:
                if accelerator.is_main_process:
                    self.validate()
                accelerator.wait_for_everyone()
        progress.close()
        accelerator.wait_for_everyone()
        if self.skipped_images:
            logger.warning("Skipped %d unreadable image(s) in process %d.", self.skipped_images, accelerator.process_index)
        if accelerator.is_main_process:
            self.export_pipeline(self.output_dir)
            if self.uploader is not None:
                final = copy_pipeline_folder(self.output_dir, self.output_dir / HUB_EXPORT_DIR)
                self.uploader.submit(final, commit_message=f"Final pipeline at step {self.global_step}")
                if not self.uploader.close():
                    logger.warning("Some Hub uploads failed: %s. Local files are complete.", self.uploader.last_error)
        accelerator.end_training()
        return self.output_dir


def train(config: TrainingConfig) -> Path:
    """Run a training job; returns the folder holding the final pipeline."""
    return Trainer(config).train()
