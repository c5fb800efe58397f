"""The DiffiT training loop on ``accelerate``: one CPU to many GPUs, exact resume, EMA, validation and Hub pushes."""

from __future__ import annotations

import json
import logging
import os
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
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from huggingface_hub import constants as hub_constants
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from tqdm.auto import tqdm

from ..dataset_sources import looks_like_local_path
from ..hub import BackgroundHubUploads, create_model_card
from ..models import DiffiTTransformer2DModel, DiffiTUNet2DModel
from ..models.denoiser import DiffiTDenoiserMixin, denoiser_class
from ..models.recompute import ActivationRecomputationMixin
from ..pipelines import DiffiTPipeline
from ..presets import load_preset_config
from .config import TrainingConfig
from .data import ResumableLoader, load_training_dataset
from .objectives import build_objective


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
# A checkpoint is written under this prefix and renamed into place once complete; one being deleted is renamed
# under the other prefix first. Neither matches `CHECKPOINT_PATTERN`, so `latest` never picks them.
PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"
HUB_EXPORT_PREFIX = ".hub-export-"
TEMPORARY_PREFIXES = (PARTIAL_PREFIX, DELETING_PREFIX, HUB_EXPORT_PREFIX)
# What the final push of the output folder leaves out: checkpoints, logs, validation grids, temporary folders.
FINAL_PUSH_IGNORE = ["checkpoint-*", ".*", "logs/*", "validation/*"]


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator (else accelerate must be told to run on CPU, also when it
    launches several CPU processes)."""
    current = getattr(getattr(torch, "accelerator", None), "current_accelerator", None)
    if current is not None:
        return current() is not None
    return torch.cuda.is_available()


def build_adamw(parameters, device: torch.device, **hyperparameters) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``parameters`` as they will be trained on ``device``, with torch's fused kernel
    where that device has one (one kernel for all tensors instead of a dozen small ops per tensor: 4-6x faster steps
    on CPU, and on GPU the usual choice); otherwise torch's default implementation. The update is AdamW's either
    way, and the state dict has the same format, so checkpoints resume across the two."""
    parameters = list(parameters)
    fused = device.type in _get_fused_kernels_supported_devices() and all(
        parameter.is_floating_point() for parameter in parameters if parameter.requires_grad
    )
    return torch.optim.AdamW(parameters, fused=fused or None, **hyperparameters)


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


def load_vae(name_or_path: str) -> AutoencoderKL:
    """The frozen ``AutoencoderKL`` whose latent space a model trains in; a one-line error when it cannot be had
    (a missing local folder, or a Hub id that is not cached while offline)."""
    try:
        return AutoencoderKL.from_pretrained(name_or_path).requires_grad_(False).eval()
    except OSError as error:
        if Path(name_or_path).expanduser().exists() or looks_like_local_path(name_or_path):
            raise FileNotFoundError(f"Cannot load the VAE {name_or_path!r}: {error}".splitlines()[0]) from error
        if hub_constants.HF_HUB_OFFLINE:
            raise ValueError(
                f"Cannot load the VAE {name_or_path!r}: the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the "
                "local cache; run once online to cache it, or pass --vae a local AutoencoderKL folder."
            ) from error
        raise ValueError(f"Cannot load the VAE {name_or_path!r}: {error}".splitlines()[0]) from error


def find_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in ``output_dir`` (complete or not), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint (``None`` when it is): the training state is missing or unreadable,
    or a file it lists is missing or has another size than when it was saved."""
    state_file = folder / TRAINING_STATE_FILE
    if folder.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)):
        return "it is a checkpoint whose saving (or deletion) was interrupted"
    if not state_file.is_file():
        return f"it has no {TRAINING_STATE_FILE}"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as error:
        return f"its {TRAINING_STATE_FILE} is unreadable ({error})"
    for name, size in state.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes instead of {size}"
    return None


def resolve_resume_checkpoint(output_dir: Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (the newest complete one, ``None`` when there is none yet) or an
    explicit folder, which must be a complete checkpoint."""
    if resume_from_checkpoint == "latest":
        for checkpoint in reversed(find_checkpoints(output_dir)):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning("Not resuming from %s: %s.", checkpoint, problem)
        return None
    path = Path(resume_from_checkpoint)
    problem = checkpoint_problem(path)
    if problem is not None and not (path / TRAINING_STATE_FILE).exists() and not path.name.startswith(PARTIAL_PREFIX):
        raise FileNotFoundError(
            f"{str(path)!r} is not a training checkpoint (no {TRAINING_STATE_FILE}); pass 'latest' or a "
            f"checkpoint-N folder from a previous run."
        )
    if problem is not None:
        raise ValueError(
            f"Cannot resume from {str(path)!r}: {problem}, so it is incomplete or corrupt; pass 'latest' (the newest "
            "complete checkpoint) or an earlier checkpoint-N folder."
        )
    return path


def run_in_output_dir(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds (part of) a training run: checkpoints or a saved pipeline."""
    if not output_dir.is_dir():
        return False
    names = [path.name for path in output_dir.iterdir()]
    return "model_index.json" in names or any(
        CHECKPOINT_PATTERN.match(name) or name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)) for name in names
    )


def check_output_dir(config: TrainingConfig) -> None:
    """Refuse an ``output_dir`` that is a file, or that holds another run unless it is resumed or overwritten."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {str(output_dir)!r} is a file; pass a folder (new, or this run's).")
    if run_in_output_dir(output_dir) and not (config.resume_from_checkpoint or config.overwrite_output_dir):
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} already holds a training run; pass --resume_from_checkpoint latest to "
            "continue it, --overwrite_output_dir to start afresh (its checkpoints are deleted), or another folder."
        )


def clear_previous_run(output_dir: Path) -> None:
    """Delete the checkpoints, logs and validation grids of the run an ``--overwrite_output_dir`` run replaces."""
    for path in output_dir.iterdir():
        if CHECKPOINT_PATTERN.match(path.name) or path.name.startswith(TEMPORARY_PREFIXES) or path.name in ("logs", "validation"):
            shutil.rmtree(path)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def delete_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint so that an interruption never leaves a half-deleted folder under a checkpoint name: it is
    renamed away first (atomic), then removed."""
    doomed = checkpoint.with_name(DELETING_PREFIX + checkpoint.name)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (saved -> current)`` for every model config key whose value differs (private keys aside)."""
    keys = sorted((set(saved) | set(current)) - {key for key in set(saved) | set(current) if key.startswith("_")})
    return [f"{key} ({saved.get(key)!r} -> {current.get(key)!r})" for key in keys if saved.get(key) != current.get(key)]


def json_config(config: Any) -> dict[str, Any]:
    """A model config as JSON would give it back (tuples as lists)."""
    return json.loads(json.dumps(dict(config), default=str))


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
    """Runs one training job described by a ``TrainingConfig`` (see ``train``).

    Everything that can be checked before step 1 is checked in ``__init__`` and at the start of ``train``: the output
    folder, the VAE, the data, the checkpoint to resume from and its model config. After ``train``,
    ``hub_push_error`` says why the final Hub push failed (``None`` when it worked or there was none).
    """

    def __init__(self, config: TrainingConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        check_output_dir(config)
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
        self.vae = None
        if config.vae is not None:
            self.vae = load_vae(config.vae).to(self.accelerator.device)
        data = config.data
        self.dataset = load_training_dataset(
            data, process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes
        )
        # accelerate prepares the DataLoader: it shards map-style batches over the processes and moves them here.
        self.loader = ResumableLoader(
            self.dataset, config.train_batch_size, num_workers=data.dataloader_num_workers, device=self.accelerator.device
        )

        in_channels, sample_size = data.num_channels, data.resolution
        latents_info = getattr(self.dataset, "latents_info", None)
        if latents_info is not None:
            self._check_vae_matches(latents_info)
            in_channels, sample_size = latents_info["latent_shape"][0], latents_info["latent_shape"][1]
        elif self.vae is not None:
            downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            if data.resolution % downscale:
                raise ValueError(
                    f"`resolution` ({data.resolution}) must be divisible by the VAE's downscale factor {downscale}."
                )
            in_channels, sample_size = self.vae.config.latent_channels, data.resolution // downscale
        self.objective = build_objective(config.objective)
        model = self.build_denoiser(num_classes=self.dataset.num_classes, in_channels=in_channels, sample_size=sample_size)
        if not isinstance(model, DiffiTDenoiserMixin):
            raise ValueError(
                f"`build_denoiser` returned a {type(model).__name__}; the trainer needs a model with the "
                "`DiffiTDenoiserMixin` interface (diffit_diffusers.models.denoiser)."
            )
        model.register_to_config(**self.objective.parameterization.to_config())
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.apply_activation_recomputation(model, config.activation_recomputation)
        model.train()
        optimizer = build_adamw(
            model.parameters(),
            self.accelerator.device,
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
                foreach=True,
            )
            self.ema.to(self.accelerator.device)
            self.accelerator.register_for_checkpointing(self.ema)
        self.global_step = 0
        self.hub_push_error: str | None = None
        self.uploads = None
        if config.push_to_hub and self.accelerator.is_main_process:
            # The repo id is resolved (and the repo created) in the background: an unreachable Hub only warns.
            self.uploads = BackgroundHubUploads(
                config.hub_model_id or self.output_dir.resolve().name,
                token=config.hub_token,
                private=config.hub_private_repo,
            )

    def _check_vae_matches(self, latents_info: dict[str, Any]) -> None:
        """Cached latents need the VAE they were encoded with, for the pipeline to decode the samples."""
        if self.vae is None:
            raise ValueError(
                f"--latents_dataset needs --vae (the latents were encoded with {latents_info['vae']!r}): the saved "
                "pipeline decodes its samples with it."
            )
        ours = (self.vae.config.latent_channels, self.vae.config.scaling_factor)
        theirs = (latents_info["latent_shape"][0], latents_info["scaling_factor"])
        if ours != theirs:
            raise ValueError(
                f"--vae {self.config.vae!r} (latent channels, scaling factor {ours}) is not the VAE the latents were "
                f"encoded with ({latents_info['vae']!r}, {theirs}); pass --vae {latents_info['vae']}."
            )

    def build_denoiser(self, *, num_classes: int | None, in_channels: int, sample_size: int) -> ModelMixin:
        """The freshly initialised denoiser, from ``config.model_config`` (see ``build_denoiser``). Override it to
        train another ``ModelMixin`` with the ``DiffiTDenoiserMixin`` interface and ``config.in_channels`` and
        ``config.sample_size``; the trainer writes the objective's parameterization into its config."""
        return build_denoiser(self.config, num_classes=num_classes, in_channels=in_channels, sample_size=sample_size)

    @staticmethod
    def apply_activation_recomputation(model: ModelMixin, setting: str) -> None:
        """``--activation_recomputation``: ``"model"`` leaves the model's default, ``"on"``/``"off"`` switch it."""
        if setting == "model":
            return
        if not isinstance(model, ActivationRecomputationMixin):
            raise ValueError(
                f"`activation_recomputation={setting!r}` needs a DiffiT model, but the denoiser is a "
                f"{type(model).__name__}; leave it at 'model'."
            )
        if setting == "on":
            model.enable_activation_recomputation()
        else:
            model.disable_activation_recomputation()

    @property
    def unwrapped_model(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def skipped_images(self) -> int:
        """Unreadable images this process skipped so far (all DataLoader workers)."""
        return self.loader.skipped_images

    # Checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a resumable checkpoint (model, EMA, optimizer, LR schedule, RNG, data position, step), crash-safely.

        Everything is written into ``.partial-checkpoint-N``; once every process is done, the main process writes
        ``training_state.json`` (with the size of every file), flushes the files and the folder to the disk and
        renames it to ``checkpoint-N`` (an atomic ``os.replace``). Only then are checkpoints beyond
        ``checkpoints_total_limit`` deleted. An interruption at any point leaves the previous checkpoints intact and
        at most a ``.partial-`` folder that ``latest`` ignores.
        """
        accelerator = self.accelerator
        checkpoint = self.output_dir / f"checkpoint-{self.global_step}"
        partial = checkpoint.with_name(PARTIAL_PREFIX + checkpoint.name)
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        (partial / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(self.loader.state_dict()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(path for path in partial.rglob("*") if path.is_file())
            state = {
                "global_step": self.global_step,
                "num_processes": accelerator.num_processes,
                "model_config": json_config(self.unwrapped_model.config),
                "files": {path.relative_to(partial).as_posix(): path.stat().st_size for path in files},
            }
            (partial / TRAINING_STATE_FILE).write_text(json.dumps(state))
            for path in [*files, partial / TRAINING_STATE_FILE, partial]:
                fsync_path(path)
            if checkpoint.exists():
                delete_checkpoint(checkpoint)
            os.replace(partial, checkpoint)
            fsync_path(self.output_dir)
            if self.config.checkpoints_total_limit is not None:
                complete = [path for path in find_checkpoints(self.output_dir) if checkpoint_problem(path) is None]
                for old in complete[: max(len(complete) - self.config.checkpoints_total_limit, 0)]:
                    delete_checkpoint(old)
        accelerator.wait_for_everyone()
        logger.info("Saved checkpoint %s", checkpoint)
        return checkpoint

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore everything ``save_checkpoint`` wrote, after checking it fits this run."""
        state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{checkpoint} was saved by {state['num_processes']} process(es) but this run has "
                f"{self.accelerator.num_processes}; resume with the same number of processes."
            )
        if "model_config" in state:
            differences = model_config_differences(state["model_config"], json_config(self.unwrapped_model.config))
            if differences:
                raise ValueError(
                    f"{checkpoint} holds a model with another config ({', '.join(differences)}); resume with the "
                    "--model_config (and data settings) it was trained with, or train into a new --output_dir."
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
        """Save the EMA weights as a complete ``DiffiTPipeline`` folder with a model card and a sample grid; with
        ``push_to_hub`` the card's usage snippet loads the resolved ``namespace/name`` repo."""
        dataset_name = self.config.data.dataset_name

        def export():
            pipeline = self.build_pipeline()
            pipeline.set_progress_bar_config(disable=True)
            pipeline.save_pretrained(folder)
            images, _ = sample_grid(pipeline, self.config, seed=self.config.seed)
            create_model_card(
                folder,
                repo_id=self.uploads.resolved_repo_id() if self.uploads is not None else None,
                datasets=[dataset_name] if dataset_name else None,
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
            "dataset": config.data.dataset_name or config.data.train_data_dir or config.data.latents_dataset,
            "resolution": config.data.resolution,
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
        """Queue background uploads of the EMA pipeline (and optionally the training state), each from a private
        folder deleted once uploaded: the pipeline exported anew, the checkpoint as hard links (its files are never
        rewritten, and ``checkpoints_total_limit`` may delete it before the upload runs)."""
        step = self.global_step
        folder = self.export_pipeline(self.output_dir / f"{HUB_EXPORT_PREFIX}step-{step}")
        self.uploads.upload(folder, commit_message=f"Step {step}", delete_after=True)
        if self.config.hub_push_training_state:
            snapshot = self.output_dir / f"{HUB_EXPORT_PREFIX}{checkpoint.name}"
            shutil.copytree(checkpoint, snapshot, copy_function=os.link, dirs_exist_ok=True)
            self.uploads.upload(
                snapshot,
                path_in_repo=f"training_state/{checkpoint.name}",
                commit_message=f"Training state at step {step}",
                delete_after=True,
            )

    def push_final(self) -> None:
        """Upload the finished output folder (checkpoints, logs and temporary folders left out), wait for every
        upload and record in ``hub_push_error`` why the final one failed, if it did."""
        final = self.uploads.upload(
            self.output_dir,
            commit_message=f"Final pipeline at step {self.global_step}",
            ignore_patterns=FINAL_PUSH_IGNORE,
        )
        self.uploads.wait()
        if self.uploads.failures:
            logger.warning(
                "Some Hub uploads failed (%d; last: %s). Local files are complete.",
                self.uploads.failures,
                self.uploads.last_error,
            )
        error = final.exception()
        if error is not None:
            self.hub_push_error = f"{type(error).__name__}: {error}".splitlines()[0]

    # The loop ---------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's loss on one batch: images (VAE-encoded first when training in latent space) or cached
        latent posteriors, from which a fresh latent is sampled."""
        if "latent_mean" in batch:
            parameters = torch.cat([batch["latent_mean"], batch["latent_logvar"]], dim=1)
            clean = DiagonalGaussianDistribution(parameters).sample() * self.vae.config.scaling_factor
        elif self.vae is not None:
            with torch.no_grad():
                posterior = self.vae.encode(batch["pixel_values"].to(self.vae.dtype)).latent_dist
                clean = posterior.sample() * self.vae.config.scaling_factor
        else:
            clean = batch["pixel_values"]
        # A sampled posterior is a strided view; the objective's `randn_like` follows the memory layout, so both
        # latent paths hand it a contiguous tensor and draw the same noise.
        return self.objective.loss(self.model, clean.contiguous(), batch.get("class_labels"))

    def train(self) -> Path:
        """Train to ``max_train_steps`` and save the final EMA pipeline in ``output_dir``; returns that folder."""
        config, accelerator = self.config, self.accelerator
        checkpoint = None
        if config.resume_from_checkpoint:
            checkpoint = resolve_resume_checkpoint(self.output_dir, config.resume_from_checkpoint)
            if checkpoint is not None:
                self.load_checkpoint(checkpoint)
        if accelerator.is_main_process and self.output_dir.is_dir():
            if config.overwrite_output_dir and checkpoint is None:
                clear_previous_run(self.output_dir)
            for leftover in self.output_dir.iterdir():
                if leftover.name.startswith(TEMPORARY_PREFIXES):
                    shutil.rmtree(leftover)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            accelerator.init_trackers("diffit", config={k: v for k, v in config.options().items() if v is not None})
        images_per_step = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        progress = tqdm(
            total=config.max_train_steps,
            initial=self.global_step,
            desc="Training",
            disable=not accelerator.is_local_main_process,
        )
        step_started = time.perf_counter()
        data_seconds = 0.0
        while self.global_step < config.max_train_steps:
            with accelerator.accumulate(self.model):
                data_started = time.perf_counter()
                batch = self.loader.next_batch()
                data_seconds += time.perf_counter() - data_started
                loss = self.training_step(batch)
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
                "data_wait_share": data_seconds / max(elapsed, 1e-9),
            }
            data_seconds = 0.0
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_sec']:.1f}")
            if self.global_step % config.logging_steps == 0:
                logs["skipped_images"] = self.skipped_images
                accelerator.log(logs, step=self.global_step)
            if self.global_step % config.checkpointing_steps == 0:
                checkpoint = self.save_checkpoint()
                if self.uploads is not None:
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
            if self.uploads is not None:
                self.push_final()
        accelerator.end_training()
        return self.output_dir


def train(config: TrainingConfig) -> Path:
    """Run a training job; returns the folder holding the final pipeline."""
    return Trainer(config).train()
