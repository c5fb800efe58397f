"""DiffiTPipeline: class-conditional or unconditional sampling with a DiffiT denoiser, in image or latent space."""

from __future__ import annotations

import difflib
import inspect
import os
from contextlib import nullcontext
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.guiders.guider_utils import BaseGuidance
from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.models.cache_utils import CacheMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..loaders.lora_pipeline import DiffiTLoraLoaderMixin
from ..loaders.single_file import (
    OFFICIAL_SAMPLING_DEFAULTS,
    CheckpointConversionError,
    imagenet_id2label,
    official_recipe,
    official_scheduler,
)
from ..models import DiffiTTransformer2DModel, DiffiTUNet2DModel
from ..models.denoiser import DENOISER_CLASSES, DiffiTDenoiserMixin
from .denoiser_wrapper import DenoiserWrapper, apply_saved_parameterization, check_scheduler, is_edm_scheduler
from .guidance import GUIDANCE_SCHEDULES
from .guiders import DiffiTGuidance, check_guider
from .model_index import (
    check_pipeline_folder,
    download_pipeline_repo,
    resolve_installed_classes,
    write_generic_loader_files,
)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class DiffiTPipeline(DiffusionPipeline, DiffiTLoraLoaderMixin):
    r"""Generate images with a DiffiT denoiser and any diffusers scheduler.

    ``from_pretrained`` is diffusers' ``DiffusionPipeline.from_pretrained`` with all its keywords (``variant``,
    ``dtype`` per component, ``device_map``, ``quantization_config``, component overrides, Hub options) and runs
    no code from the folder; ``from_single_file`` builds the released sampling setup around an NVIDIA checkpoint.

    Parameters:
        denoiser: a ``DiffiTUNet2DModel`` (image space) or ``DiffiTTransformer2DModel`` (latent space with a VAE).
        scheduler: any ``KarrasDiffusionSchedulers`` member (DEIS included) or an EDM scheduler, whatever the
            denoiser was trained with: :mod:`~diffit_diffusers.pipelines.denoiser_wrapper` converts between the
            scheduler's convention and the denoiser's ``parameterization``. Assigning ``pipe.scheduler`` later is
            checked the same way.
        vae: an ``AutoencoderKL``; when present, the denoiser works on its latents and images are decoded with
            ``vae.decode(latents / vae.config.scaling_factor)``.
        id2label: class id -> name(s) (comma-separated synonyms), for ``get_label_ids``.
        default_num_inference_steps: steps ``__call__`` uses when ``num_inference_steps`` is ``None``.
        default_guidance_scale: guidance scale used when ``guidance_scale`` is ``None`` (the NVIDIA 256px
            conversion stores the official 4.4 here).
        default_guidance_schedule: ``"constant"`` or ``"power_cosine"``, used when ``guidance_schedule`` is ``None``.
        default_guidance_power: exponent of the power-cosine ramp, used when ``guidance_power`` is ``None``.
        default_guided_channels: leading prediction channels that are guided when ``guided_channels`` is left out
            (3 in DiffiT); ``None`` guides all of them. A learned variance is never guided.
        guider: a diffusers guider (``ClassifierFreeGuidance``, ``AdaptiveProjectedGuidance``, ``DiffiTGuidance``,
            ...) used instead of the ``default_guidance_*`` settings; see ``__call__``.
    """

    model_cpu_offload_seq = "denoiser->vae"
    _optional_components = ["vae", "guider"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        denoiser: DiffiTTransformer2DModel | DiffiTUNet2DModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
        default_num_inference_steps: int = 50,
        default_guidance_scale: float = 1.0,
        default_guidance_schedule: str = "constant",
        default_guidance_power: float = 4.0,
        default_guided_channels: int | None = 3,
        guider: BaseGuidance | None = None,
    ):
        super().__init__()
        if not isinstance(denoiser, DiffiTDenoiserMixin):
            raise ValueError(
                f"`denoiser` is a {type(denoiser).__name__}; DiffiTPipeline needs a model with the DiffiTDenoiserMixin "
                f"interface, e.g. one of {', '.join(DENOISER_CLASSES)}."
            )
        check_scheduler(scheduler)
        apply_saved_parameterization(denoiser, scheduler)
        if default_guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"Unknown guidance schedule {default_guidance_schedule!r}; choose one of "
                f"{', '.join(GUIDANCE_SCHEDULES)}."
            )
        if guider is not None:
            check_guider(guider)
        self.register_modules(denoiser=denoiser, scheduler=scheduler, vae=vae, guider=guider)
        self._current_timestep = None
        id2label = {int(k): v for k, v in id2label.items()} if id2label else None
        self.register_to_config(
            id2label=id2label,
            default_num_inference_steps=default_num_inference_steps,
            default_guidance_scale=default_guidance_scale,
            default_guidance_schedule=default_guidance_schedule,
            default_guidance_power=default_guidance_power,
            default_guided_channels=default_guided_channels,
        )
        self.labels = {}
        for class_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = class_id
        self.labels = dict(sorted(self.labels.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "scheduler":
            check_scheduler(value)
        super().__setattr__(name, value)

    @property
    def current_timestep(self) -> float | None:
        """The step being sampled on the 0..T training scale (``None`` outside ``__call__``), for the timestep ranges
        of diffusers' caches (``current_timestep_callback=lambda: pipe.current_timestep``)."""
        return self._current_timestep

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the denoiser, ``None`` for an unconditional one."""
        return self.denoiser.num_classes

    @property
    def null_class_id(self) -> int | None:
        """Label id of the denoiser's null class (needed for guidance), ``None`` if it has none."""
        return self.denoiser.null_class_id

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (see ``id2label``) to class ids; unknown names raise with the closest known names."""
        if not self.labels:
            raise ValueError("This pipeline has no `id2label` mapping; pass integer class ids instead of names.")
        ids = []
        for name in [label] if isinstance(label, str) else label:
            if name not in self.labels:
                close = difflib.get_close_matches(name, list(self.labels), n=5, cutoff=0.5)
                hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else ""
                raise ValueError(f"Unknown class name {name!r}.{hint} See `pipe.labels` for all names.")
            ids.append(self.labels[name])
        return ids

    def _class_label_tensor(
        self, class_labels, batch_size: int | None, num_images_per_prompt: int, generator, device
    ) -> torch.Tensor | None:
        num_classes = self.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError("The denoiser is unconditional (`num_classes=None`); call without `class_labels`.")
            return None
        if class_labels is None:
            label_generator = generator[0] if isinstance(generator, list) else generator
            labels = torch.randint(
                0,
                num_classes,
                (batch_size or 1,),
                generator=label_generator,
                device=getattr(label_generator, "device", "cpu"),
            )
            return labels.to(device).repeat_interleave(num_images_per_prompt)
        ids = [self.get_label_ids(c)[0] if isinstance(c, str) else c for c in _label_list(class_labels)]
        if not ids or min(ids) < 0 or max(ids) >= num_classes:
            raise ValueError(
                f"`class_labels` must be class ids in [0, {num_classes - 1}] (or names from `id2label`); "
                f"received {class_labels}."
            )
        if batch_size is not None and batch_size != len(ids):
            raise ValueError(
                f"`batch_size={batch_size}` disagrees with the {len(ids)} `class_labels`; leave `batch_size` out "
                "when passing labels (use `num_images_per_prompt` for several images per label)."
            )
        return torch.tensor(ids, dtype=torch.long).repeat_interleave(num_images_per_prompt).to(device)

    def _guidance_timestep(self, t: torch.Tensor, step_index: int, num_steps: int) -> float:
        """``t`` on the scheduler's ``0..T-1`` scale for the guidance ramp (EDM schedulers count steps instead)."""
        if is_edm_scheduler(self.scheduler):
            return self.scheduler.config.get("num_train_timesteps", 1000) * (1.0 - step_index / num_steps)
        return float(t)

    def _latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        config = self.denoiser.config
        return (batch_size, config.in_channels, config.sample_size, config.sample_size)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        batch_size: int | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        guidance_power: float | None = None,
        guided_channels: int | None | str = "default",
        guider: BaseGuidance | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample images.

        Args:
            class_labels: class ids or names (see ``id2label``) for a class-conditional denoiser; ``None`` draws
                random classes (conditional) or samples unconditionally.
            batch_size: number of images (or random labels) when ``class_labels`` is ``None`` (default 1); with
                ``class_labels`` it may only repeat their count.
            num_images_per_prompt: images per class label (or per batch entry).
            num_inference_steps: denoising steps (default: ``default_num_inference_steps``).
            guidance_scale: classifier-free guidance scale ``s``; ``1`` disables guidance.
            guidance_schedule: ``"constant"`` or ``"power_cosine"`` (ramp from no guidance at ``t = T`` to ``s``).
            guidance_power: exponent of the power-cosine ramp.
            guided_channels: number of leading prediction channels that are guided (3 in DiffiT); ``None`` guides
                all. The four ``guidance_*``/``guided_channels`` settings build a ``DiffiTGuidance`` (missing ones
                come from the pipeline's ``default_*`` config); they cannot be combined with a ``guider``.
            guider: a diffusers guider that combines the conditional and null-class predictions of the denoiser
                (in the denoiser's own output convention), e.g. ``ClassifierFreeGuidance(guidance_scale=2, start=0.2,
                stop=0.8)`` for a guidance interval or ``AdaptiveProjectedGuidance``; default: the pipeline's
                ``guider``, else ``DiffiTGuidance`` from the ``default_*`` config. While a guider needs both
                predictions, one batched ``[cond; null]`` forward computes them.
            generator: a torch generator, or one per image, for reproducible sampling.
            latents: initial noise ``(B, C, H, W)`` in the denoiser's input space.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (the final denoiser-space
                sample).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called as ``fn(pipe, step_index, timestep, callback_kwargs)`` after each step; it
                may return a dict replacing any of ``callback_on_step_end_tensor_inputs``.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (subset of ``["latents"]``).

        Returns:
            ``ImagePipelineOutput`` with ``images``.
        """
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        self._check_call_arguments(output_type, callback_inputs, num_inference_steps, batch_size, num_images_per_prompt)
        guider = self._resolve_guider(guider, guidance_scale, guidance_schedule, guidance_power, guided_channels)
        device = self._execution_device

        labels = self._class_label_tensor(class_labels, batch_size, num_images_per_prompt, generator, device)
        total = labels.shape[0] if labels is not None else (batch_size or 1) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but {total} images are sampled; pass one "
                "generator per image or a single generator."
            )
        shape = self._latent_shape(total)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, received {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=self.denoiser.dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        wrapper = DenoiserWrapper(self.denoiser.parameterization, self.scheduler, prediction_channels=shape[1])
        timesteps = self.scheduler.timesteps
        guidance_timesteps = [self._guidance_timestep(t, i, len(timesteps)) for i, t in enumerate(timesteps)]
        guided_steps = self._guided_steps(guider, guidance_timesteps)
        if any(guided_steps) and self.null_class_id is None:
            raise ValueError(
                "Classifier-free guidance needs a class-conditional denoiser with a null class "
                "(`num_classes` set and `class_dropout_prob > 0` when it was trained); use `guidance_scale=1`."
            )
        # Caches that keep one state for every call (not per `cache_context`) need the same batch at every step.
        fixed_batch = any(guided_steps) and isinstance(
            self._denoiser_cache_config(), (PyramidAttentionBroadcastConfig, FasterCacheConfig)
        )
        labels_by_prediction = {
            "pred_cond": labels,
            "pred_uncond": None if self.null_class_id is None else torch.full_like(labels, self.null_class_id),
        }
        if self._denoiser_cache_config() is not None:
            self.denoiser._reset_stateful_cache()

        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        for i, t in enumerate(self.progress_bar(timesteps)):
            self._current_timestep = guidance_timesteps[i]
            # The denoiser's output in its own convention (see denoiser_wrapper), guided there ...
            step = wrapper.prepare(self.scheduler.scale_model_input(latents, t), t)
            guider.set_state(step=i, num_inference_steps=len(timesteps), timestep=guidance_timesteps[i])
            output = self._guided_prediction(guider, step, labels_by_prediction, fixed_batch)
            # ... then in the scheduler's convention.
            latents = self.scheduler.step(step.scheduler_output(output), t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                step_tensors = {"latents": latents}
                callback_kwargs = {name: step_tensors[name] for name in callback_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)
        self._current_timestep = None

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            else:
                images = latents
            images = (images.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _resolve_guider(
        self,
        guider: BaseGuidance | None,
        guidance_scale: float | None,
        guidance_schedule: str | None,
        guidance_power: float | None,
        guided_channels: int | None | str,
    ) -> BaseGuidance:
        """The guider of this call: ``guider``, else a ``DiffiTGuidance`` from the ``guidance_*`` arguments, else the
        pipeline's ``guider``, else a ``DiffiTGuidance`` from the pipeline's ``default_*`` config."""
        settings = {
            "guidance_scale": guidance_scale,
            "schedule": guidance_schedule,
            "power": guidance_power,
            "guided_channels": guided_channels,
        }
        given = {name: value for name, value in settings.items() if value is not None and value != "default"}
        if guided_channels is None:
            given["guided_channels"] = None
        if guider is not None or (self.guider is not None and not given):
            if given:
                raise ValueError(
                    f"Pass either `guider` or the guidance settings {sorted(given)}, not both; configure the guider "
                    "instead (e.g. `guider.new(guidance_scale=...)`)."
                )
            guider = guider if guider is not None else self.guider
            check_guider(guider)
            return guider
        config = self.config
        defaults = {
            "guidance_scale": config.default_guidance_scale,
            "schedule": config.default_guidance_schedule,
            "power": config.default_guidance_power,
            "guided_channels": config.default_guided_channels,
        }
        return DiffiTGuidance(
            **{**defaults, **given}, num_train_timesteps=self.scheduler.config.get("num_train_timesteps", 1000)
        )

    @staticmethod
    def _guided_steps(guider: BaseGuidance, training_timesteps: list[float]) -> list[bool]:
        """Per step, whether ``guider`` will ask for the unconditional prediction too."""
        guided = []
        for step, timestep in enumerate(training_timesteps):
            guider.set_state(step=step, num_inference_steps=len(training_timesteps), timestep=timestep)
            guided.append(guider.num_conditions > 1)
        return guided

    def _denoiser_cache_config(self) -> Any:
        """The diffusers cache config enabled on the denoiser (``enable_cache``), ``None`` if none is."""
        return self.denoiser._cache_config if isinstance(self.denoiser, CacheMixin) else None

    def _guided_prediction(
        self,
        guider: BaseGuidance,
        step: Any,
        labels_by_prediction: dict[str, torch.Tensor | None],
        fixed_batch: bool,
    ) -> torch.Tensor:
        """One step's denoiser output, guided by ``guider`` (whose state is set for the step).

        The predictions the guider asks for (``pred_cond``, and ``pred_uncond`` with null-class labels) come from one
        batched forward of ``step.denoiser_input`` inside ``denoiser.cache_context``; with ``fixed_batch`` both are
        always computed. The guider combines the prediction channels in the denoiser's own convention; a learned
        variance is the conditional one.

        Returns:
            The guided denoiser output ``(B, C or 2C, H, W)``.
        """
        batches = guider.prepare_inputs({"class_labels": tuple(labels_by_prediction.values())})
        needed = [getattr(batch, guider._identifier_key) for batch in batches]
        computed = list(labels_by_prediction) if fixed_batch else needed
        if isinstance(self._denoiser_cache_config(), FasterCacheConfig):
            computed = sorted(computed, key=lambda name: name != "pred_uncond")  # FasterCache expects [uncond; cond]
        labels = [labels_by_prediction[name] for name in computed]
        model_labels = None if labels[0] is None else torch.cat(labels)
        model_input = step.denoiser_input
        batched_input = torch.cat([model_input] * len(computed)) if len(computed) > 1 else model_input
        timestep = step.denoiser_timestep.expand(batched_input.shape[0])
        for _ in batches:
            guider.prepare_models(self.denoiser)
        cache_context = self.denoiser.cache_context if isinstance(self.denoiser, CacheMixin) else nullcontext
        with cache_context("+".join(computed)):
            output = self.denoiser(batched_input, timestep=timestep, class_labels=model_labels, return_dict=False)[0]
        outputs = dict(zip(computed, output.chunk(len(computed))))
        prediction_channels = model_input.shape[1]
        for batch in batches:
            batch.noise_pred = outputs[getattr(batch, guider._identifier_key)][:, :prediction_channels]
            guider.cleanup_models(self.denoiser)
        prediction = guider(batches).pred
        if output.shape[1] == prediction_channels:
            return prediction
        return torch.cat([prediction, outputs["pred_cond"][:, prediction_channels:]], dim=1)

    def _check_call_arguments(
        self,
        output_type: str,
        callback_inputs: list[str],
        num_inference_steps: int,
        batch_size: int | None,
        num_images_per_prompt: int,
    ) -> None:
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("batch_size", 1 if batch_size is None else batch_size),
            ("num_images_per_prompt", num_images_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unsupported `output_type` {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}.")
        unknown = set(callback_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save as a diffusers folder that ``DiffiTPipeline.from_pretrained`` and the generic
        ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` both load, locally or from the Hub.

        Args:
            save_directory: the folder; created if missing.
            safe_serialization: write ``.safetensors`` weights (else PyTorch ``.bin``).
            variant: write ``diffusion_pytorch_model.<variant>.safetensors`` (load with the same ``variant``).
            max_shard_size: shard weights larger than this (e.g. ``"5GB"``).
            push_to_hub: not taken here; use ``push_to_hub`` (which also writes a DiffiT model card).
        """
        if push_to_hub:
            raise ValueError(
                "`DiffiTPipeline.save_pretrained(push_to_hub=True)` is not supported; call "
                "`pipeline.push_to_hub(repo_id)`, which also writes a DiffiT model card."
            )
        super().save_pretrained(
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            **kwargs,
        )
        write_generic_loader_files(Path(save_directory), self)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload DiffiT pipeline",
        private: bool = False,
        token: str | None = None,
        sample_images: list | None = None,
        **model_card_kwargs: Any,
    ) -> str:
        """Save the pipeline with a DiffiT model card (see ``diffit_diffusers.hub.create_model_card``, which takes
        ``model_card_kwargs`` such as ``license``, ``datasets`` or ``training_summary``) and upload it to ``repo_id``.

        Returns:
            The URL of the Hub commit.
        """
        from ..hub import create_model_card, push_folder_to_hub

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            model_card_kwargs.setdefault("config", dict(self.denoiser.config))
            create_model_card(folder, repo_id=repo_id, sample_images=sample_images, **model_card_kwargs)
            return push_folder_to_hub(folder, repo_id, token=token, private=private, commit_message=commit_message)


    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        **kwargs: Any,
    ):
        """diffusers' ``load_config`` for a pipeline folder, with its entries for ``diffit_diffusers`` pointed at the
        installed classes (so ``from_pretrained`` builds them without running code from the folder).

        Raises:
            FileNotFoundError: the folder has no ``model_index.json`` (the message names ``from_single_file`` when
                it holds raw checkpoint files).
            ValueError: ``model_index.json`` is not valid JSON or names another pipeline class.
        """
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and not kwargs.get("subfolder"):
            check_pipeline_folder(folder)
        outputs = super().load_config(
            pretrained_model_name_or_path,
            return_unused_kwargs=return_unused_kwargs,
            return_commit_hash=return_commit_hash,
            **kwargs,
        )
        resolve_installed_classes(outputs[0] if isinstance(outputs, tuple) else outputs, cls)
        return outputs

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs: Any) -> str:
        """Download what ``from_pretrained`` needs from a DiffiT pipeline repo and return the local folder.

        ``from_pretrained`` calls this for a Hub id with its keywords: ``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``force_download``, ``variant`` and ``use_safetensors``: only the weight files diffusers
        will load are fetched, and the folders of components passed as keyword arguments are not downloaded.
        Unlike ``DiffusionPipeline.download`` it resolves no code from the repo.

        Raises:
            FileNotFoundError: the repo has no ``model_index.json`` (the message names ``from_single_file`` when
                it holds raw checkpoint files).
        """
        return download_pipeline_repo(
            pretrained_model_name,
            skipped_components=kwargs,
            variant=kwargs.get("variant"),
            use_safetensors=kwargs.get("use_safetensors"),
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"),
            local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")),
        )

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        *,
        vae: AutoencoderKL | str | os.PathLike | None = None,
        scheduler: SchedulerMixin | None = None,
        config: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        **pipeline_kwargs: Any,
    ) -> DiffiTPipeline:
        """The released sampling setup around one of NVIDIA's checkpoint files (``nvidia/DiffiT``).

        The denoiser is ``DiffiTTransformer2DModel.from_single_file(pretrained_model_link_or_path, ...)``; the
        scheduler is ADM/DiT's DDPM schedule with learned-range variance (``official_scheduler``; fixed variance for a
        checkpoint without variance channels); the defaults are the official recipe for the checkpoint's resolution
        (``official_recipe``: 250 steps, 3 guided channels, the guidance of the release) and, for a 1000-class
        model, the ImageNet label names.

        Args:
            pretrained_model_link_or_path: a local file, ``hf://<repo>[@<revision>]/<file>`` or a Hub URL such as
                ``https://huggingface.co/nvidia/DiffiT/blob/main/diffit_256.safetensors``.
            vae: an ``AutoencoderKL`` or its folder / Hub id (the release used ``stabilityai/sd-vae-ft-ema``);
                without one the pipeline returns latents only (``output_type="latent"``).
            scheduler: replaces the official DDPM scheduler.
            config: a diffusers folder or Hub repo whose denoiser config to use instead of the inferred one.
            torch_dtype: dtype of the denoiser and the VAE.
            revision: the Hub revision of the file (``cache_dir``, ``token``, ``local_files_only`` and
                ``force_download`` are ``huggingface_hub``'s other download options).
            **pipeline_kwargs: ``DiffiTPipeline`` arguments (``id2label``, ``default_guidance_scale``, ...) that
                replace the official defaults.
        """
        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        denoiser = DiffiTTransformer2DModel.from_single_file(
            pretrained_model_link_or_path,
            config=config,
            torch_dtype=torch_dtype,
            revision=revision,
            force_download=force_download,
            **hub_kwargs,
        )
        if isinstance(vae, (str, os.PathLike)):
            try:
                vae = AutoencoderKL.from_pretrained(str(vae), torch_dtype=torch_dtype, **hub_kwargs)
            except (OSError, ValueError) as error:
                raise CheckpointConversionError(
                    f"Could not load the VAE {str(vae)!r} ({error}). Pass a local AutoencoderKL folder, a reachable "
                    "Hub id or an AutoencoderKL (`--vae` on the command line)."
                ) from error
        if vae is not None and vae.config.latent_channels != denoiser.config.in_channels:
            raise CheckpointConversionError(
                f"The VAE has {vae.config.latent_channels} latent channels but the transformer expects "
                f"{denoiser.config.in_channels}; pass the VAE the checkpoint was trained with."
            )
        defaults = {
            **OFFICIAL_SAMPLING_DEFAULTS,
            **official_recipe(denoiser.grid_size),
            "id2label": imagenet_id2label() if denoiser.config.num_classes == 1000 else None,
        }
        return cls(
            denoiser=denoiser, scheduler=scheduler or official_scheduler(denoiser.config.learn_sigma), vae=vae, **{**defaults, **pipeline_kwargs}
        )


def _label_list(class_labels: Any) -> list:
    """``class_labels`` (an id, a name, a list of them, or a 0-d / 1-d integer tensor) as a flat list; anything
    else (floats, bools, nested lists) raises a ``ValueError``."""
    if torch.is_tensor(class_labels) or isinstance(class_labels, np.ndarray):
        if class_labels.ndim > 1 or not _is_integer_dtype(class_labels.dtype):
            raise ValueError(
                f"`class_labels` must be a 0-d or 1-d integer tensor, got {class_labels.dtype} of shape "
                f"{tuple(class_labels.shape)}."
            )
        return [int(c) for c in class_labels.reshape(-1).tolist()]
    items = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer, str)):
            raise ValueError(
                f"`class_labels` must be class ids (int) or names (str), or a flat list of them; got {item!r} "
                f"({type(item).__name__})."
            )
    return [item if isinstance(item, str) else int(item) for item in items]


def _is_integer_dtype(dtype: Any) -> bool:
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return np.issubdtype(dtype, np.integer)
