"""Training objectives: EDM (image space, paper App. I), DDPM epsilon / v / sample, and ADM's learned-sigma loss.

Each objective draws noise levels with the global torch RNG (so ``accelerate``'s checkpoints restore it exactly),
computes the loss of a denoiser on a clean batch, names the ``parameterization`` the trainer writes into the
denoiser's config, and builds the scheduler saved with the trained model (any other supported scheduler can
replace it: the pipeline converts between conventions).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.denoiser import DenoiserParameterization


OBJECTIVES = ("edm", "epsilon", "v_prediction", "sample", "learned_sigma")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` broadcastable against ``like``."""
    return values.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class EDMObjective:
    """Karras et al. (2022) preconditioning and loss, matching diffusers' EDM schedulers (``prediction_type
    "epsilon"``): ``D(x) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = ln(sigma) / 4`` and log-normal
    ``sigma``. With EDM's loss weight ``lambda = 1 / c_out^2`` the loss is a plain MSE on ``F``."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    name = "edm"

    @property
    def parameterization(self) -> DenoiserParameterization:
        """What the trained denoiser's config records."""
        return DenoiserParameterization("edm", sigma_data=self.sigma_data)

    def loss(self, model, clean: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        sigma = (torch.randn(clean.shape[0], device=clean.device) * self.p_std + self.p_mean).exp()
        noisy = clean + torch.randn_like(clean) * _expand(sigma, clean)
        s2, d2 = _expand(sigma, clean) ** 2, self.sigma_data**2
        c_skip = d2 / (s2 + d2)
        c_out = _expand(sigma, clean) * self.sigma_data / (s2 + d2).sqrt()
        c_in = 1.0 / (s2 + d2).sqrt()
        prediction = model(c_in * noisy, 0.25 * sigma.log(), class_labels).sample
        target = (clean - c_skip * noisy) / c_out
        return F.mse_loss(prediction.float(), target.float())

    def make_scheduler(self) -> SchedulerMixin:
        return EDMDPMSolverMultistepScheduler(
            sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data, prediction_type="epsilon"
        )


@dataclass
class DDPMObjective:
    """DDPM training on a discrete 0..T-1 schedule predicting the noise (``"epsilon"``), the velocity
    (``"v_prediction"``) or the clean sample (``"sample"``)."""

    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"

    @property
    def name(self) -> str:
        return self.prediction_type

    @property
    def parameterization(self) -> DenoiserParameterization:
        """What the trained denoiser's config records."""
        config = self.noise_scheduler.config
        return DenoiserParameterization(
            "vp",
            prediction_type=self.prediction_type,
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            learn_sigma=self.name == "learned_sigma",
        )

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"`prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}."
            )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
        )

    def _noisy(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        timesteps = torch.randint(0, self.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noise = torch.randn_like(clean)
        return self.noise_scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    def loss(self, model, clean: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        noisy, noise, timesteps = self._noisy(clean)
        prediction = model(noisy, timesteps, class_labels).sample[:, : clean.shape[1]]
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = clean
        return F.mse_loss(prediction.float(), target.float())

    def make_scheduler(self) -> SchedulerMixin:
        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config, algorithm_type="dpmsolver++")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL divergence between two diagonal Gaussians, elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian, elementwise (nats)."""

    def standard_normal_cdf(value: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (value + 0.044715 * value.pow(3))))

    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, (cdf_plus - cdf_min).clamp(min=1e-12).log()),
    )
    return log_probs


class LearnedSigmaObjective(DDPMObjective):
    """ADM/DiT hybrid loss for models that also output the variance interpolation ``v`` (``learn_sigma``):
    ``MSE(epsilon) + L_vlb``, where the VLB term trains only the variance (the mean is detached), with
    ``log sigma^2 = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta~_t``."""

    name = "learned_sigma"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
        super().__init__("epsilon", num_train_timesteps, beta_schedule)
        scheduler = self.noise_scheduler
        betas = scheduler.betas.double()
        alphas_cumprod = scheduler.alphas_cumprod.double()
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
        self.tables = {
            "log_betas": betas.log(),
            "posterior_log_variance": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * previous.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        }

    def _gather(self, name: str, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(self.tables[name].to(timesteps.device)[timesteps].float(), like)

    def variational_bound(
        self,
        epsilon: torch.Tensor,
        variance_values: torch.Tensor,
        clean: torch.Tensor,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-example VLB term in bits per dimension, ``(B,)``."""
        g = functools.partial(self._gather, timesteps=timesteps, like=clean)
        frac = (variance_values + 1.0) / 2.0
        model_log_variance = frac * g("log_betas") + (1.0 - frac) * g("posterior_log_variance")
        predicted_clean = g("sqrt_recip_alphas_cumprod") * noisy - g("sqrt_recipm1_alphas_cumprod") * epsilon
        model_mean = g("posterior_mean_coef1") * predicted_clean + g("posterior_mean_coef2") * noisy
        true_mean = g("posterior_mean_coef1") * clean + g("posterior_mean_coef2") * noisy
        kl = normal_kl(true_mean, g("posterior_log_variance"), model_mean, model_log_variance)
        kl = kl.mean(dim=tuple(range(1, kl.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(clean, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dim=tuple(range(1, nll.ndim))) / math.log(2.0)
        return torch.where(timesteps == 0, nll, kl)

    def loss(self, model, clean: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        noisy, noise, timesteps = self._noisy(clean)
        output = model(noisy, timesteps, class_labels).sample.float()
        channels = clean.shape[1]
        if output.shape[1] != 2 * channels:
            raise ValueError(
                f"The learned-sigma loss needs {2 * channels} output channels (epsilon and variance), got "
                f"{output.shape[1]}; build the model with `learn_sigma=True` or train with `epsilon`."
            )
        epsilon, variance_values = output[:, :channels], output[:, channels:]
        mse = F.mse_loss(epsilon, noise.float())
        vlb = self.variational_bound(epsilon.detach(), variance_values, clean.float(), noisy.float(), timesteps)
        return mse + vlb.mean()

    def make_scheduler(self) -> SchedulerMixin:
        return DDPMScheduler.from_config(self.noise_scheduler.config, variance_type="learned_range")


def build_objective(name: str, *, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """The objective called ``name`` (one of ``OBJECTIVES``)."""
    if name == "edm":
        return EDMObjective()
    if name in ("epsilon", "v_prediction", "sample"):
        return DDPMObjective(name, num_train_timesteps, beta_schedule)
    if name == "learned_sigma":
        return LearnedSigmaObjective(num_train_timesteps, beta_schedule)
    raise ValueError(f"Unknown training objective {name!r}; choose one of {', '.join(OBJECTIVES)}.")
