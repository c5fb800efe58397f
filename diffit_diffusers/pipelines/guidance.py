"""DiffiT's classifier-free guidance: the power-cosine scale ramp and guidance on the first channels only."""

from __future__ import annotations

import math

import torch


GUIDANCE_SCHEDULES = ("constant", "power_cosine")


def guidance_weight(
    timestep: float | torch.Tensor,
    guidance_scale: float,
    schedule: str = "constant",
    power: float = 4.0,
    num_train_timesteps: int = 1000,
) -> float:
    """The guidance weight ``w(t)`` at ``timestep`` on the training scale ``0..num_train_timesteps-1``.

    ``"constant"``: ``w = s``. ``"power_cosine"`` (the released 256px recipe, from MDT):
    ``w(t) = (s - 1) * 0.5 * (1 - cos(pi * (1 - t / T) ** power)) + 1``, so there is no guidance at ``t = T`` and
    full guidance at ``t = 0``.
    """
    if schedule == "constant":
        return float(guidance_scale)
    if schedule == "power_cosine":
        progress = (1.0 - float(timestep) / num_train_timesteps) ** power
        return (guidance_scale - 1.0) * 0.5 * (1.0 - math.cos(math.pi * progress)) + 1.0
    raise ValueError(f"Unknown guidance schedule {schedule!r}; choose one of {', '.join(GUIDANCE_SCHEDULES)}.")


def apply_guidance(
    conditional: torch.Tensor, unconditional: torch.Tensor, weight: float, guided_channels: int | None
) -> torch.Tensor:
    """``uncond + w (cond - uncond)`` on the first ``guided_channels`` channels; the rest keep ``conditional``.

    Args:
        conditional: model output ``(B, C, H, W)`` for the real labels.
        unconditional: model output ``(B, C, H, W)`` for the null labels.
        weight: guidance weight ``w``.
        guided_channels: how many leading channels to guide; ``None`` guides all of them.

    Returns:
        The guided output ``(B, C, H, W)``.
    """
    guided = conditional.shape[1] if guided_channels is None else min(guided_channels, conditional.shape[1])
    mixed = unconditional[:, :guided] + weight * (conditional[:, :guided] - unconditional[:, :guided])
    return torch.cat([mixed, conditional[:, guided:]], dim=1)
