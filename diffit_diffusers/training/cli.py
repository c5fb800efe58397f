"""Command-line entry points behind ``examples/train_diffit.py`` and ``examples/train_latent_diffit.py``.

Exit status: ``EXIT_OK`` (0) trained and saved; ``EXIT_ERROR`` (1) a problem found before or during training,
reported as one ``error:`` line; 2 invalid flags (argparse's usage message); ``EXIT_HUB_PUSH_FAILED`` (3) trained
and saved every local file, but the final ``--push_to_hub`` upload failed.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from accelerate import PartialState

from .config import parse_config
from .trainer import Trainer


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_HUB_PUSH_FAILED = 3

IMAGE_DEFAULTS: dict[str, Any] = {"model_config": "tiny", "objective": "edm"}
LATENT_DEFAULTS: dict[str, Any] = {
    "model_config": "DiffiT-S/2",
    "objective": "learned_sigma",
    "vae": "stabilityai/sd-vae-ft-ema",
    "resolution": 256,
    "learning_rate": 1e-4,
}


def run_trainer(make_trainer: Callable[[], Trainer], result: str) -> int:
    """Build a trainer with ``make_trainer``, train, report ``Saved <result> to <folder>`` and return the exit status;
    user errors (a bad path, bad data, a bad option value) become one ``error:`` line."""
    try:
        trainer = make_trainer()
        output_dir = trainer.train()
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if not PartialState().is_main_process:
        return EXIT_OK
    print(f"Saved {result} to {output_dir}")
    if trainer.hub_push_error is not None:
        print(
            f"error: the final push to the Hub failed ({trainer.hub_push_error}); every local file is saved in "
            f"{output_dir}, upload it later with `hf upload <repo_id> {output_dir}`.",
            file=sys.stderr,
        )
        return EXIT_HUB_PUSH_FAILED
    return EXIT_OK


def _run(argv: list[str] | None, description: str, defaults: dict[str, Any]) -> int:
    config = parse_config(argv, description, defaults)
    return run_trainer(lambda: Trainer(config), "the trained DiffiTPipeline")


def main_image(argv: list[str] | None = None) -> int:
    """Train an image-space DiffiT (``DiffiTUNet2DModel``, EDM by default)."""
    return _run(argv, "Train an image-space DiffiT U-Net with accelerate.", IMAGE_DEFAULTS)


def main_latent(argv: list[str] | None = None) -> int:
    """Train a latent DiffiT (``DiffiTTransformer2DModel`` on VAE latents, ADM learned-sigma loss by default)."""
    return _run(argv, "Train a latent DiffiT transformer on VAE latents with accelerate.", LATENT_DEFAULTS)
