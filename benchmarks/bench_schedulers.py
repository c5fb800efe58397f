"""Which scheduler should a trained DiffiT save? Class accuracy and wall time of every supported scheduler.

Trains the ``digits-8`` U-Net on scikit-learn's digits through the real trainer (``small_digits_config``: 8x8,
class-conditional, EDM by default) or reuses ``--model_dir``, then for every supported scheduler (built with
``from_config`` from the saved one, as a user swaps them; DDIM and DDPM with ``clip_sample=False``, see below) at
10, 25 and 50 steps:

- accuracy: share of guided samples (scale 2, ``--samples_per_class`` per digit, fixed seed) that the demo's digits
  classifier (``digit_accuracy``) reads as the requested digit;
- seconds: median wall time of sampling one guided batch of 10 images, timed in interleaved rounds over all
  settings (see ``harness.py``), so load on a shared machine hits every setting alike.

The recommendation is the fastest setting whose accuracy is within 2 points of the best one; the trainer saves it.
DDIM and DDPM run without their default ``clip_sample=True``, which fights guidance (reported as ``*_clip_sample``).

    python benchmarks/bench_schedulers.py --output benchmarks/results/cpu-schedulers.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from harness import interleaved_median_seconds, machine_info, write_report

from diffit_diffusers import DiffiTPipeline
from diffit_diffusers.pipelines.denoiser_wrapper import SUPPORTED_SCHEDULERS
from diffit_diffusers.training import train
from diffit_diffusers.training.demo import digit_accuracy, small_digits_config


STEPS = (10, 25, 50)
GUIDANCE_SCALE = 2.0
NO_CLIPPING = {"DDIMScheduler": {"clip_sample": False}, "DDPMScheduler": {"clip_sample": False}}


def scheduler_settings(saved_config: dict) -> dict[str, Any]:
    """Name -> scheduler for every supported scheduler that can be built here, plus DDIM/DDPM with clipping."""
    schedulers = {}
    for name in SUPPORTED_SCHEDULERS:
        try:
            schedulers[name] = getattr(diffusers, name).from_config(saved_config, **NO_CLIPPING.get(name, {}))
        except ImportError:  # DPMSolverSDEScheduler needs torchsde
            continue
    for name in NO_CLIPPING:
        schedulers[f"{name}_clip_sample"] = getattr(diffusers, name).from_config(saved_config)
    return schedulers


def sample(pipe: DiffiTPipeline, labels: list[int], per_label: int, steps: int) -> torch.Tensor:
    return pipe(
        class_labels=labels,
        num_images_per_prompt=per_label,
        guidance_scale=GUIDANCE_SCALE,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[..., 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="a trained digits pipeline folder (default: train one)")
    parser.add_argument("--objective", default="edm", help="training objective when training here")
    parser.add_argument("--max_train_steps", type=int, default=800)
    parser.add_argument("--samples_per_class", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    report: dict[str, Any] = {"machine": machine_info(device)}

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            started = time.perf_counter()
            model_dir = train(small_digits_config(str(Path(scratch) / "digits"), args.objective, args.max_train_steps))
            report["training_seconds"] = round(time.perf_counter() - started, 1)
        pipe = DiffiTPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        report["model"] = {
            "preset": "digits-8",
            "parameterization": pipe.denoiser.parameterization.to_config(),
            "training_steps": args.max_train_steps if args.model_dir is None else None,
            "saved_scheduler": type(pipe.scheduler).__name__,
        }
        schedulers = scheduler_settings(pipe.scheduler.config)

        digits = list(range(10))
        requested = [digit for digit in digits for _ in range(args.samples_per_class)]
        results: dict[str, dict[str, Any]] = {}
        for name, scheduler in schedulers.items():
            pipe.scheduler = scheduler
            for steps in STEPS:
                images = sample(pipe, digits, args.samples_per_class, steps)
                results[f"{name}@{steps}"] = {
                    "scheduler": name,
                    "steps": steps,
                    "accuracy": round(digit_accuracy(images, requested), 4),
                }

        def timed(name: str, steps: int):
            def run():
                pipe.scheduler = schedulers[name]
                sample(pipe, digits, 1, steps)

            return run

        seconds = interleaved_median_seconds(
            {key: timed(r["scheduler"], r["steps"]) for key, r in results.items()}, repeats=args.repeats, device=device
        )
        for key, value in seconds.items():
            results[key]["seconds_per_10_images"] = round(value, 4)

    best = max(r["accuracy"] for r in results.values())
    eligible = [r for r in results.values() if r["accuracy"] >= best - 0.02]
    choice = min(eligible, key=lambda r: r["seconds_per_10_images"])
    report.update(
        {
            "guidance_scale": GUIDANCE_SCALE,
            "samples_per_setting": len(requested),
            "results": sorted(results.values(), key=lambda r: (r["scheduler"], r["steps"])),
            "best_accuracy": best,
            "recommended": choice,
            "note": "CPU shared with other jobs: wall times are interleaved medians, compare them as ratios.",
        }
    )
    write_report(report, args.output)


if __name__ == "__main__":
    main()
