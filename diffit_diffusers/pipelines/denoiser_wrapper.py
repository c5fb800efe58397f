"""Drive any supported diffusers scheduler with a denoiser trained under any parameterization.

This is k-diffusion's "denoiser wrapper" idea. Every convention is a reparameterization of one variance-exploding
view of the noisy sample and of one denoiser (Karras et al. 2022, Eq. 1 and 2):

    x = x_0 + sigma * eps,        D(x; sigma) ~ E[x_0 | x].

**Schedulers** (what ``scale_model_input`` hands the model, and what ``step`` wants back):

- *Discrete VP schedulers* (every ``KarrasDiffusionSchedulers`` member but ``EDMEulerScheduler``, DEIS included)
  give the model ``x_in = alpha x_0 + s eps`` with ``alpha = 1 / sqrt(1 + sigma^2)``, ``s = sigma alpha`` and
  ``sigma_t = sqrt((1 - abar_t) / abar_t)`` from their ``alphas_cumprod`` (interpolated in ``log sigma`` between
  timesteps). DDPM-style schedulers keep ``x_in`` as their sample; Euler-style ones keep ``x`` and divide it by
  ``sqrt(1 + sigma^2)``: both hand over the same ``x_in``, and ``sigma`` is read from that scaling. ``step`` wants
  ``eps = (x - D) / sigma`` (``"epsilon"``), ``v = alpha eps - s D`` (``"v_prediction"``) or ``D`` (``"sample"``).
- *EDM schedulers* give ``x_in = c_in x`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` and want ``F`` with
  ``D = c_skip x + c_out F``, i.e. ``F = (D - c_skip x) / c_out`` (``c_out`` is negated for ``"v_prediction"``).

**Denoisers** (:class:`~diffit_diffusers.models.denoiser.DenoiserParameterization`):

- ``"edm"``: ``D = c_skip x + c_out F(c_in x, ln(sigma) / 4)`` with the model's ``sigma_data``.
- ``"vp"``: ``F(x / sqrt(1 + sigma^2), tau)``, where ``tau`` is ``sigma`` mapped onto the training schedule by
  linear interpolation of ``log sigma_t`` between the discrete timesteps (clamped to ``0 .. T - 1``), and
  ``D = x - sigma eps`` (epsilon), ``D = alpha^2 x - s v`` (v-prediction) or ``D = F`` (sample).

When the scheduler already speaks the denoiser's convention (a VP scheduler on the training ``alphas_cumprod`` with
the training ``prediction_type``, or an EDM scheduler with the model's ``sigma_data`` on an ``"edm"`` model) nothing
is converted, so such pipelines (NVIDIA's converted ones, every folder the trainer saved) sample exactly as before.
Guidance mixes the conditional and unconditional outputs in the denoiser's convention: every conversion above is
affine in the output at a fixed ``x`` and guidance weights sum to one, so guiding there equals guiding ``D``.

ADM's learned variance (``learn_sigma``, the second half of the output channels) goes to ``DDPMScheduler`` with
``variance_type="learned"`` or ``"learned_range"`` and is dropped for every other scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from ..models.denoiser import DenoiserParameterization


#: Schedulers whose model inputs and outputs follow EDM's preconditioning.
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
#: Discrete variance-preserving schedulers (DEIS is a ``KarrasDiffusionSchedulers`` member).
VP_SCHEDULERS = tuple(member.name for member in KarrasDiffusionSchedulers if member.name not in EDM_SCHEDULERS)
SUPPORTED_SCHEDULERS = VP_SCHEDULERS + EDM_SCHEDULERS
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def is_edm_scheduler(scheduler: object) -> bool:
    """Whether ``scheduler`` is (a subclass of) one of ``EDM_SCHEDULERS``."""
    return any(cls.__name__ in EDM_SCHEDULERS for cls in type(scheduler).__mro__)


def check_scheduler(scheduler: object) -> None:
    """Raise a ``ValueError`` naming the supported schedulers if the pipeline cannot drive ``scheduler`` (one of
    ``SUPPORTED_SCHEDULERS`` or a subclass)."""
    if not any(cls.__name__ in SUPPORTED_SCHEDULERS for cls in type(scheduler).__mro__):
        raise ValueError(
            f"DiffiTPipeline cannot drive {type(scheduler).__name__} (flow-matching, consistency and other "
            f"non-diffusion schedulers are not supported); use one of {', '.join(SUPPORTED_SCHEDULERS)}."
        )


def wants_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` takes the model's variance values (DDPM with a learned variance type)."""
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in LEARNED_VARIANCE_TYPES


def _log_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """``log sigma_t = log sqrt((1 - abar_t) / abar_t)`` in float64, increasing in ``t``."""
    alphas_cumprod = alphas_cumprod.double().cpu().numpy()
    return 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)


def scheduler_parameterization(scheduler: SchedulerMixin) -> dict:
    """The parameterization fields of a denoiser that speaks ``scheduler``'s convention without conversion: an EDM
    scheduler means ``"edm"`` with its ``sigma_data``; a VP scheduler means ``"vp"`` with its ``prediction_type``
    and beta schedule. Every field but ``learn_sigma`` (which the scheduler cannot tell) is returned."""
    check_scheduler(scheduler)
    config = scheduler.config
    if is_edm_scheduler(scheduler):
        if config.prediction_type != "epsilon":
            raise ValueError(
                f"{type(scheduler).__name__}(prediction_type={config.prediction_type!r}) matches no denoiser "
                "parameterization; set the denoiser's `parameterization` fields."
            )
        parameterization = DenoiserParameterization("edm", sigma_data=float(config.sigma_data))
    elif config.get("trained_betas") is not None:
        raise ValueError(
            "A scheduler with `trained_betas` matches no denoiser parameterization; set the denoiser's "
            "`parameterization` fields."
        )
    else:
        parameterization = DenoiserParameterization(
            "vp",
            prediction_type=config.prediction_type,
            num_train_timesteps=int(config.num_train_timesteps),
            beta_schedule=config.beta_schedule,
            beta_start=float(config.beta_start),
            beta_end=float(config.beta_end),
        )
    fields = parameterization.to_config()
    del fields["learn_sigma"]
    return fields


def infer_parameterization(denoiser_config: dict, scheduler: SchedulerMixin) -> dict:
    """The parameterization fields of a denoiser saved before they existed, read off the scheduler saved with it.

    Before these fields, the pipeline fed the model exactly what the saved scheduler gave it, so the model speaks
    that scheduler's convention (``scheduler_parameterization``). A U-Net whose ``out_channels`` is twice its
    ``in_channels`` (the old way to ask for learned variance) gets ``learn_sigma=True`` and ``out_channels`` halved.

    Returns:
        The config entries to register on the denoiser.
    """
    fields = scheduler_parameterization(scheduler)
    in_channels, out_channels = denoiser_config.get("in_channels"), denoiser_config.get("out_channels")
    if "learn_sigma" not in denoiser_config and out_channels == 2 * in_channels:
        fields.update(learn_sigma=True, out_channels=in_channels)
    return fields


def apply_saved_parameterization(denoiser: torch.nn.Module, scheduler: SchedulerMixin) -> None:
    """Give a denoiser loaded from a folder saved before the parameterization fields existed the parameterization
    of the scheduler saved with it (see ``infer_parameterization``); a no-op for every other denoiser."""
    config = denoiser.config
    loaded_without_fields = "_name_or_path" in config and "parameterization" in config.get("_use_default_values", ())
    if not loaded_without_fields:
        return
    saved = {k: v for k, v in config.items() if k not in config.get("_use_default_values", ())}
    denoiser.register_to_config(**infer_parameterization(saved, scheduler))
    used_defaults = [name for name in config["_use_default_values"] if name != "parameterization"]
    denoiser.register_to_config(_use_default_values=used_defaults)


@dataclass
class WrappedStep:
    """One sampling step seen from both sides: what to feed the denoiser, and how to hand its output on.

    Attributes:
        wrapper: the ``DenoiserWrapper`` that made it.
        denoiser_input: the denoiser's input ``(B, C, H, W)``.
        denoiser_timestep: its timestep, a 0-d float tensor (training-scale ``t`` or ``ln(sigma) / 4``).
        sigma: the noise level, ``None`` when nothing is converted.
        sample: the variance-exploding view ``x = x_0 + sigma eps`` of the sample, ``None`` likewise.
    """

    wrapper: "DenoiserWrapper"
    denoiser_input: torch.Tensor
    denoiser_timestep: torch.Tensor
    sigma: float | None
    sample: torch.Tensor | None

    def scheduler_output(self, model_output: torch.Tensor) -> torch.Tensor:
        """The denoiser's output ``(B, C or 2C, H, W)`` in the convention ``scheduler.step`` expects."""
        return self.wrapper.to_scheduler_output(self, model_output)


class DenoiserWrapper:
    """Converts between one scheduler's convention and one denoiser's (see the module docstring).

    Args:
        parameterization: how the denoiser was trained.
        scheduler: a scheduler from ``SUPPORTED_SCHEDULERS``, with ``set_timesteps`` already called.
        prediction_channels: channels of the sample (the denoiser outputs twice as many with ``learn_sigma``).
    """

    def __init__(
        self, parameterization: DenoiserParameterization, scheduler: SchedulerMixin, prediction_channels: int
    ):
        check_scheduler(scheduler)
        self.parameterization = parameterization
        self.scheduler = scheduler
        self.prediction_channels = prediction_channels
        self.edm_scheduler = is_edm_scheduler(scheduler)
        self.passes_variance = wants_learned_variance(scheduler)
        if self.passes_variance and not parameterization.learn_sigma:
            raise ValueError(
                f"DDPMScheduler(variance_type={scheduler.config.variance_type!r}) needs a denoiser that also "
                f"predicts the variance (`learn_sigma=True`), but this one does not. Use variance_type='fixed_small' "
                "or another scheduler."
            )
        if parameterization.parameterization == "vp":
            self.training_log_sigmas = _log_sigmas(parameterization.alphas_cumprod)
        if not self.edm_scheduler:
            self.scheduler_log_sigmas = _log_sigmas(scheduler.alphas_cumprod)
        self.native = self._speaks_denoiser_convention()

    def _speaks_denoiser_convention(self) -> bool:
        p, config = self.parameterization, self.scheduler.config
        if self.edm_scheduler:
            return (
                p.parameterization == "edm" and config.prediction_type == "epsilon" and config.sigma_data == p.sigma_data
            )
        if p.parameterization != "vp" or p.prediction_type != config.prediction_type:
            return False
        training, scheduler = p.alphas_cumprod, self.scheduler.alphas_cumprod.float().cpu()
        return training.shape == scheduler.shape and torch.allclose(training, scheduler, rtol=1e-6, atol=0.0)

    def scheduler_sigma(self, timestep: torch.Tensor | float) -> float:
        """The noise level ``sigma`` of the scheduler's current sample (call after ``scale_model_input``)."""
        scheduler = self.scheduler
        if self.edm_scheduler:
            return float(scheduler.sigmas[scheduler.step_index])
        scale = float(scheduler.scale_model_input(torch.ones((), dtype=torch.float64), timestep))
        if scale != 1.0:  # Euler-style: x_in = x / sqrt(1 + sigma^2)
            return math.sqrt(max(1.0 / scale**2 - 1.0, 0.0))
        log_sigmas = self.scheduler_log_sigmas
        return math.exp(np.interp(float(timestep), np.arange(len(log_sigmas)), log_sigmas))

    def prepare(self, scheduler_input: torch.Tensor, timestep: torch.Tensor) -> WrappedStep:
        """The denoiser's input and timestep for ``scheduler_input = scheduler.scale_model_input(latents, t)``."""
        if self.native:
            timestep = torch.as_tensor(timestep, device=scheduler_input.device).float()
            return WrappedStep(self, scheduler_input, timestep, None, None)
        p = self.parameterization
        sigma = self.scheduler_sigma(timestep)
        if self.edm_scheduler:
            sample = scheduler_input * math.sqrt(sigma**2 + self.scheduler.config.sigma_data**2)
        else:
            sample = scheduler_input * math.sqrt(1.0 + sigma**2)
        if p.parameterization == "edm":
            denoiser_input = sample / math.sqrt(sigma**2 + p.sigma_data**2)
            denoiser_timestep = 0.25 * math.log(sigma)
        else:
            denoiser_input = sample / math.sqrt(1.0 + sigma**2)
            log_sigmas = self.training_log_sigmas
            denoiser_timestep = float(np.interp(math.log(sigma), log_sigmas, np.arange(len(log_sigmas))))
        timestep_tensor = torch.tensor(denoiser_timestep, dtype=torch.float32, device=scheduler_input.device)
        return WrappedStep(self, denoiser_input, timestep_tensor, sigma, sample)

    def denoised(self, step: WrappedStep, prediction: torch.Tensor) -> torch.Tensor:
        """``D(x; sigma)`` from the denoiser's prediction channels, in float32."""
        p, sigma, sample = self.parameterization, step.sigma, step.sample.float()
        prediction = prediction.float()
        if p.parameterization == "edm":
            d2 = p.sigma_data**2
            return d2 / (sigma**2 + d2) * sample + sigma * p.sigma_data / math.sqrt(sigma**2 + d2) * prediction
        if p.prediction_type == "epsilon":
            return sample - sigma * prediction
        if p.prediction_type == "v_prediction":
            alpha = 1.0 / math.sqrt(1.0 + sigma**2)
            return alpha**2 * sample - sigma * alpha * prediction
        return prediction

    def from_denoised(self, step: WrappedStep, denoised: torch.Tensor) -> torch.Tensor:
        """What ``scheduler.step`` expects, given ``D(x; sigma)``."""
        config, sigma, sample = self.scheduler.config, step.sigma, step.sample.float()
        if self.edm_scheduler:
            d2 = config.sigma_data**2
            c_out = sigma * config.sigma_data / math.sqrt(sigma**2 + d2)
            if config.prediction_type == "v_prediction":
                c_out = -c_out
            return (denoised - d2 / (sigma**2 + d2) * sample) / c_out
        if config.prediction_type == "sample":
            return denoised
        epsilon = (sample - denoised) / sigma
        if config.prediction_type == "epsilon":
            return epsilon
        alpha = 1.0 / math.sqrt(1.0 + sigma**2)
        return alpha * epsilon - sigma * alpha * denoised

    def to_scheduler_output(self, step: WrappedStep, model_output: torch.Tensor) -> torch.Tensor:
        """The denoiser's output in the scheduler's convention; learned variance kept only where it is used."""
        channels = self.prediction_channels
        expected = channels * (2 if self.parameterization.learn_sigma else 1)
        if model_output.shape[1] != expected:
            raise ValueError(
                f"The denoiser returned {model_output.shape[1]} channels; its config (learn_sigma="
                f"{self.parameterization.learn_sigma}) says {expected}."
            )
        if self.native:
            return model_output if self.passes_variance else model_output[:, :channels]
        prediction = self.from_denoised(step, self.denoised(step, model_output[:, :channels]))
        prediction = prediction.to(model_output.dtype)
        if self.passes_variance:
            return torch.cat([prediction, model_output[:, channels:]], dim=1)
        return prediction
