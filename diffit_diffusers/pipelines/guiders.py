"""DiffiT's guidance rule as a diffusers guider, and the check that a diffusers guider can drive ``DiffiTPipeline``."""

from __future__ import annotations

import logging
import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import guider_utils
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from .guidance import GUIDANCE_SCHEDULES, apply_guidance, guidance_weight


#: Predictions ``DiffiTPipeline`` can make: the real labels and the null class.
PIPELINE_PREDICTIONS = ("pred_cond", "pred_uncond")


class DiffiTGuidance(BaseGuidance):
    r"""Classifier-free guidance as DiffiT samples: ``uncond + w(t) (cond - uncond)`` on the first ``guided_channels``.

    ``w(t)`` is ``guidance_scale`` (``schedule="constant"``) or the power-cosine ramp of the released 256px recipe
    (``schedule="power_cosine"``, see ``guidance_weight``), evaluated at the step's timestep on the
    ``0..num_train_timesteps`` training scale, which ``DiffiTPipeline`` passes to ``set_state``. Channels after
    ``guided_channels`` keep the conditional prediction. The pipeline hands guiders the prediction channels only, so a
    learned variance (``learn_sigma``) always comes from the conditional output and is never mixed.

    Args:
        guidance_scale: the scale ``s``; 1 disables guidance (one conditional forward per step).
        schedule: ``"constant"`` or ``"power_cosine"``.
        power: exponent of the power-cosine ramp.
        guided_channels: leading prediction channels that are guided (3 in DiffiT's release); ``None`` guides all.
        num_train_timesteps: ``T`` of the training scale the ramp is defined on.
        start: fraction of the steps after which guidance starts (a guidance interval, as diffusers' guiders).
        stop: fraction of the steps after which guidance stops.
        enabled: whether guidance is on at all.
    """

    _input_predictions = list(PIPELINE_PREDICTIONS)

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 1.0,
        schedule: str = "constant",
        power: float = 4.0,
        guided_channels: int | None = 3,
        num_train_timesteps: int = 1000,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        if schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"Unknown guidance schedule {schedule!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}.")
        if guidance_scale < 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 disables guidance), got {guidance_scale}.")
        if guided_channels is not None and guided_channels < 1:
            raise ValueError(f"`guided_channels` must be a positive integer or None (all), got {guided_channels}.")
        # DiffiT's rule is the pipeline's default, not an experiment: keep diffusers' "experimental guiders" warning
        # out of every sampling call.
        base_logger = logging.getLogger(guider_utils.__name__)
        level = base_logger.level
        base_logger.setLevel(logging.ERROR)
        try:
            super().__init__(start, stop, enabled)
        finally:
            base_logger.setLevel(level)
        self.guidance_scale = guidance_scale
        self.schedule = schedule
        self.power = power
        self.guided_channels = guided_channels
        self.num_train_timesteps = num_train_timesteps

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        """One batch per prediction this step needs: ``pred_cond`` and, while guidance is on, ``pred_uncond``."""
        return [
            self._prepare_batch(data, index, name)
            for index, name in enumerate(self._input_predictions[: self.num_conditions])
        ]

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        """Guided prediction ``(B, C, H, W)`` from the conditional and unconditional ones."""
        if not self._is_guidance_enabled():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        weight = guidance_weight(
            self._timestep, self.guidance_scale, self.schedule, self.power, self.num_train_timesteps
        )
        pred = apply_guidance(pred_cond, pred_uncond, weight, self.guided_channels)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_guidance_enabled() else 1

    def _is_guidance_enabled(self) -> bool:
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._num_inference_steps is None:
            return True
        return int(self._start * self._num_inference_steps) <= self._step < int(self._stop * self._num_inference_steps)


def check_guider(guider: BaseGuidance) -> None:
    """Raise a ``ValueError`` unless ``guider`` combines the predictions ``DiffiTPipeline`` makes, without hooks.

    Guiders that perturb the denoiser (perturbed attention, skip-layer, smoothed energy, auto guidance) need
    layer-skipping metadata for DiffiT's attention that diffusers does not have.
    """
    if not isinstance(guider, BaseGuidance):
        raise ValueError(f"`guider` must be a diffusers guider (a `BaseGuidance`), got {type(guider).__name__}.")
    unknown = sorted(set(guider._input_predictions) - set(PIPELINE_PREDICTIONS))
    if type(guider).prepare_models is not BaseGuidance.prepare_models:
        unknown = ["hooks on the denoiser's layers"]
    if unknown:
        raise ValueError(
            f"{type(guider).__name__} needs {', '.join(unknown)}, which DiffiTPipeline does not provide; use a guider "
            "that combines a conditional and an unconditional prediction (DiffiTGuidance, ClassifierFreeGuidance, "
            "AdaptiveProjectedGuidance, ClassifierFreeZeroStarGuidance, ...)."
        )
