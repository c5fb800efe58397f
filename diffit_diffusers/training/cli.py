"""Command-line entry points behind ``examples/train_diffit.py`` and ``examples/train_latent_diffit.py``."""

from __future__ import annotations

import sys
from typing import Any

from accelerate import PartialState

from .config import parse_config
from .trainer import train


IMAGE_DEFAULTS: dict[str, Any] = {"model_config": "tiny", "objective": "edm"}
LATENT_DEFAULTS: dict[str, Any] = {
    "model_config": "DiffiT-S/2",
    "objective": "learned_sigma",
    "vae": "stabilityai/sd-vae-ft-ema",
    "resolution": 256,
    "learning_rate": 1e-4,
}


def _run(argv: list[str] | None, description: str, defaults: dict[str, Any]) -> int:
    config = parse_config(argv, description, defaults)
    try:
        output_dir = train(config)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if PartialState().is_main_process:
        print(f"Saved the trained DiffiTPipeline to {output_dir}")
    return 0


def main_image(argv: list[str] | None = None) -> int:
    """Train an image-space DiffiT (``DiffiTUNet2DModel``, EDM by default)."""
    return _run(argv, "Train an image-space DiffiT U-Net with accelerate.", IMAGE_DEFAULTS)


def main_latent(argv: list[str] | None = None) -> int:
    """Train a latent DiffiT (``DiffiTTransformer2DModel`` on VAE latents, ADM learned-sigma loss by default)."""
    return _run(argv, "Train a latent DiffiT transformer on VAE latents with accelerate.", LATENT_DEFAULTS)
