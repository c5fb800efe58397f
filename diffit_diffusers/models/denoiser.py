"""The denoiser interface every DiffiT model implements, the training parameterization it records, and the one
registry of denoiser classes that the pipeline, trainer, evaluation and benchmarks look classes up in.

A denoiser exposes:

- ``num_classes``: number of classes, ``None`` for an unconditional model;
- ``null_class_id``: label id of the null class used for classifier-free guidance, ``None`` if it has none;
- ``parameterization``: a :class:`DenoiserParameterization` read from its config (how it was trained);
- ``forward(sample, timestep, class_labels=None, return_dict=True)`` with ``.sample`` of shape
  ``(B, C * (2 if learn_sigma else 1), H, W)`` (the first argument is passed positionally).

The parameterization lives in seven config fields with the same names and defaults on both models:

- ``parameterization``: ``"vp"`` (discrete variance-preserving diffusion, DDPM / ADM / DiT) or ``"edm"``
  (Karras et al. 2022 preconditioning).
- ``"vp"``: the model is called as ``F(x_t, t)`` with ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and
  ``t`` on the ``0 .. num_train_timesteps - 1`` training scale; ``prediction_type`` says whether ``F`` predicts
  ``eps`` (``"epsilon"``), ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (``"v_prediction"``) or ``x_0``
  (``"sample"``); ``num_train_timesteps``, ``beta_schedule``, ``beta_start`` and ``beta_end`` give ``abar_t`` as
  diffusers' ``DDPMScheduler`` computes it.
- ``"edm"``: ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` for ``x = x_0 + sigma eps`` with
  ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``, ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``,
  ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` and the noise conditioning ``c_noise = ln(sigma) / 4`` (EDM Table 1,
  as diffusers' EDM schedulers' ``precondition_noise``); ``sigma_data`` is the field of that name.
- ``learn_sigma``: the model also outputs ADM's variance interpolation values ``v`` (``"vp"`` only), the second
  half of its output channels.

A model built by hand gets the defaults: ``"vp"``, ``"epsilon"``, 1000 steps of the linear schedule
``1e-4 .. 0.02`` and no learned variance (DDPM's setup). The trainer and the NVIDIA converter write the fields they
train or convert with.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from diffusers import DDPMScheduler


PARAMETERIZATIONS = ("vp", "edm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


@dataclass(frozen=True)
class DenoiserParameterization:
    """How a denoiser was trained (see the module docstring for the equations); the seven config fields."""

    parameterization: str = "vp"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    sigma_data: float = 0.5
    learn_sigma: bool = False

    def __post_init__(self):
        for name, value, allowed in (
            ("parameterization", self.parameterization, PARAMETERIZATIONS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if self.num_train_timesteps < 2:
            raise ValueError(f"`num_train_timesteps` must be >= 2, got {self.num_train_timesteps}.")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"`beta_start` and `beta_end` must satisfy 0 < beta_start < beta_end < 1, got {self.beta_start} "
                f"and {self.beta_end}."
            )
        if self.sigma_data <= 0:
            raise ValueError(f"`sigma_data` must be positive, got {self.sigma_data}.")
        if self.learn_sigma and self.parameterization != "vp":
            raise ValueError("`learn_sigma=True` (ADM's learned variance) needs `parameterization='vp'`.")

    @classmethod
    def from_config(cls, config: Any) -> "DenoiserParameterization":
        """The parameterization recorded in a model config (a ``FrozenDict`` or a plain dict)."""
        defaults = cls()
        return cls(**{name: config.get(name, value) for name, value in asdict(defaults).items()})

    def to_config(self) -> dict[str, Any]:
        """The seven config fields as a dict (``model.register_to_config(**p.to_config())``)."""
        return asdict(self)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``abar_t`` for ``t = 0 .. num_train_timesteps - 1`` (``"vp"``), float32, as ``DDPMScheduler`` has it."""
        return _alphas_cumprod(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end)


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> torch.Tensor:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end
    ).alphas_cumprod


class DiffiTDenoiserMixin:
    """The denoiser interface of the module docstring, for a ``ModelMixin`` whose config holds ``num_classes`` and
    the parameterization fields and whose ``time_embedding`` is a ``DiffiTTimeEmbedding``."""

    @property
    def num_classes(self) -> int | None:
        """Number of classes for class conditioning, ``None`` for an unconditional model."""
        return self.config.num_classes

    @property
    def null_class_id(self) -> int | None:
        """Label id of the null (unconditional) class used for classifier-free guidance, or ``None``."""
        return self.time_embedding.null_class_id

    @property
    def parameterization(self) -> DenoiserParameterization:
        """How this denoiser was trained (its config's parameterization fields)."""
        return DenoiserParameterization.from_config(self.config)


#: Denoiser classes by class name; filled by ``@register_denoiser``.
DENOISER_CLASSES: dict[str, type] = {}

DenoiserClass = TypeVar("DenoiserClass", bound=type)


def register_denoiser(cls: DenoiserClass) -> DenoiserClass:
    """Class decorator adding ``cls`` to ``DENOISER_CLASSES``."""
    DENOISER_CLASSES[cls.__name__] = cls
    return cls


def denoiser_class(name: str | None, source: str = "The config") -> type:
    """The registered denoiser class called ``name``; ``source`` names where the name was read, for the error."""
    if name not in DENOISER_CLASSES:
        raise ValueError(f"{source} names {name!r}; expected one of {', '.join(DENOISER_CLASSES)}.")
    return DENOISER_CLASSES[name]

