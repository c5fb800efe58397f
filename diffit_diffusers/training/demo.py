"""The CPU demo behind ``make demo``: train the tiny image-space DiffiT on scikit-learn's digits, class-conditional,
then sample a labelled grid with guidance and check it with a digits classifier."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..pipelines import DiffiTPipeline
from .config import TrainingConfig
from .data import DataConfig
from .trainer import train


def demo_config(output_dir: str, max_train_steps: int) -> TrainingConfig:
    """The demo's training run: the ``tiny`` U-Net preset, EDM, 16x16 grayscale digits with labels."""
    return TrainingConfig(
        data=DataConfig(dataset_name="digits", label_column="label", resolution=16, num_channels=1),
        model_config="tiny",
        objective="edm",
        output_dir=output_dir,
        train_batch_size=64,
        learning_rate=1e-3,
        lr_warmup_steps=50,
        max_train_steps=max_train_steps,
        ema_decay=0.999,
        checkpointing_steps=max(max_train_steps // 2, 1),
        checkpoints_total_limit=1,
        guidance_scale=2.0,
        num_inference_steps=24,
        num_validation_images=8,
    )


def small_digits_config(
    output_dir: str, objective: str = "edm", max_train_steps: int = 800, seed: int = 0
) -> TrainingConfig:
    """A fast digits run: the ``digits-8`` U-Net preset on the native 8x8 digits, class-conditional (about 1.5 min
    on one CPU core). Its guided samples are read as the requested digit by ``digit_accuracy`` nearly always; the
    tests and ``benchmarks/bench_schedulers.py`` train it to judge samplers on a model that has learned something."""
    return TrainingConfig(
        data=DataConfig(dataset_name="digits", label_column="label", resolution=8, num_channels=1, seed=seed),
        model_config="digits-8",
        objective=objective,
        output_dir=output_dir,
        train_batch_size=64,
        learning_rate=2e-3,
        lr_warmup_steps=30,
        max_train_steps=max_train_steps,
        ema_decay=0.99,
        checkpointing_steps=max_train_steps,
        checkpoints_total_limit=1,
        guidance_scale=2.0,
        num_inference_steps=8,
        num_validation_images=1,
        logging_steps=max_train_steps,
    )


@functools.lru_cache(maxsize=1)
def digits_classifier():
    """The judge: a logistic regression fitted once on scikit-learn's 8x8 digits (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)


def digit_accuracy(images: np.ndarray, labels: list[int]) -> float:
    """Share of ``images`` (``(N, H, W)`` in [0, 1]) that ``digits_classifier`` reads as their requested label
    (samples are downsampled to 8x8 first)."""
    small = [
        np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((8, 8), Image.BILINEAR)) / 255.0
        for image in images
    ]
    predictions = digits_classifier().predict(np.stack(small).reshape(len(small), -1))
    return float((predictions == np.asarray(labels)).mean())


def run_demo(output_dir: str = "outputs/demo", max_train_steps: int = 1200, samples_per_class: int = 8) -> dict:
    """Train, sample a 10-row labelled grid with guidance, judge it, and return a summary."""
    started = time.perf_counter()
    pipeline_dir = train(demo_config(output_dir, max_train_steps))
    training_seconds = time.perf_counter() - started

    pipeline = DiffiTPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    labels = [digit for digit in range(10) for _ in range(samples_per_class)]
    images = pipeline(
        class_labels=list(range(10)),
        num_images_per_prompt=samples_per_class,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[..., 0]
    grid_path = Path(output_dir) / "digits_grid.png"
    pil_images = [Image.fromarray((image * 255).round().astype(np.uint8)).resize((48, 48), Image.NEAREST) for image in images]
    make_image_grid(pil_images, rows=10, cols=samples_per_class).save(grid_path)
    return {
        "pipeline": str(pipeline_dir),
        "model_card": str(Path(pipeline_dir) / "README.md"),
        "digits_grid": str(grid_path),
        "training_steps": max_train_steps,
        "training_seconds": round(training_seconds, 1),
        "classifier_accuracy_of_samples": round(digit_accuracy(images, labels), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_train_steps", type=int, default=1200)
    args = parser.parse_args(argv)
    if args.max_train_steps < 1:
        parser.error("--max_train_steps must be a positive integer")
    summary = run_demo(args.output_dir, args.max_train_steps)
    print(json.dumps(summary, indent=2))
    print(f"\nPipeline: {summary['pipeline']}  (DiffiTPipeline.from_pretrained({summary['pipeline']!r}))")
    print(f"Labelled sample grid (rows = digits 0-9): {summary['digits_grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
