"""Sampling with diffusers' caches and guiders: images/s and class accuracy on a trained model, speed on DiffiT-S/2.

Prints one JSON object (and writes it to ``--output`` if given).

- ``digits``: the tiny image-space U-Net that ``make demo`` trains on scikit-learn's digits (trained here unless
  ``--pipeline`` names a saved one), sampled at the demo's settings (24 steps, guidance 2). Every cache setting and
  guidance mode samples the same classes from the same noise; ``accuracy`` is the demo judge's share of samples read
  as the requested digit, ``images_per_second`` a median over interleaved timing rounds, ``speedup`` against
  uncached sampling with constant guidance.
- ``diffit_s2``: a randomly initialised DiffiT-S/2 (latent 32x32, the 256px recipe: 4.4 power-cosine guidance,
  DDPM with learned variance, 8 steps), speed only.

    python benchmarks/bench_sampling.py --output benchmarks/results/cpu-sampling.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any, Callable

import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from harness import interleaved_median_seconds, machine_info, write_report

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel
from diffit_diffusers.loaders.single_file import official_recipe, official_scheduler
from diffit_diffusers.training.demo import demo_config, digit_accuracy
from diffit_diffusers.training.trainer import train


#: A cache setting must be at least this much faster than uncached sampling ...
SPEEDUP_TARGET = 1.5
#: ... at most this many accuracy points below it.
ACCURACY_DROP_LIMIT = 2.0
#: TaylorSeer on whole ResBlocks of the U-Net (a ``cache_identifiers`` pattern), rather than on TMSA layers only.
UNET_RESBLOCKS = r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+$"
#: The same on the transformer's blocks.
TRANSFORMER_BLOCKS = r"^transformer_blocks\.\d+$"


def cache_settings(pipe: DiffiTPipeline, is_unet: bool) -> dict[str, Any]:
    """Each cache at two strengths (a milder and a stronger one); ``None`` is uncached sampling."""
    timestep = lambda: pipe.current_timestep  # noqa: E731

    def taylorseer(interval: int, **kwargs) -> TaylorSeerCacheConfig:
        return TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=3, taylor_factors_dtype=torch.float32, **kwargs
        )

    settings = {
        "none": None,
        "taylorseer_attention_2": taylorseer(2),
        "taylorseer_attention_3": taylorseer(3),
        "taylorseer_blocks_2": taylorseer(2, cache_identifiers=[UNET_RESBLOCKS if is_unet else TRANSFORMER_BLOCKS]),
        "taylorseer_blocks_3": taylorseer(3, cache_identifiers=[UNET_RESBLOCKS if is_unet else TRANSFORMER_BLOCKS]),
        "pab_2": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=timestep
        ),
        "pab_3": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=3, current_timestep_callback=timestep
        ),
        "faster_cache_2": FasterCacheConfig(unconditional_batch_skip_range=2, current_timestep_callback=timestep),
        "faster_cache_5": FasterCacheConfig(unconditional_batch_skip_range=5, current_timestep_callback=timestep),
    }
    if not is_unet:
        settings |= {
            "first_block_0.05": FirstBlockCacheConfig(threshold=0.05),
            "first_block_0.2": FirstBlockCacheConfig(threshold=0.2),
        }
    return settings


def guidance_modes(scale: float) -> dict[str, dict[str, Any]]:
    """Constant guidance, a guidance interval (none during the first quarter of the steps) and APG, at one scale."""
    return {
        "constant": {"guidance_scale": scale},
        "interval": {"guider": ClassifierFreeGuidance(guidance_scale=scale, start=0.25)},
        "apg": {"guider": AdaptiveProjectedGuidance(guidance_scale=scale)},
    }


def sampler(pipe: DiffiTPipeline, cache, call: dict[str, Any], seed: int = 0) -> Callable[[], torch.Tensor]:
    """A function that samples with ``cache`` enabled (if any) and returns the images."""

    def run() -> torch.Tensor:
        if cache is not None:
            pipe.denoiser.enable_cache(cache)
        try:
            return pipe(generator=torch.Generator().manual_seed(seed), **call).images
        finally:
            if cache is not None:
                pipe.denoiser.disable_cache()

    return run


def bench_digits(args: argparse.Namespace) -> dict[str, Any]:
    pipeline_dir = args.pipeline
    if pipeline_dir is None:
        pipeline_dir = train(demo_config(tempfile.mkdtemp(prefix="bench-sampling-"), args.train_steps))
    pipe = DiffiTPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = [digit for digit in range(10) for _ in range(args.samples_per_class)]
    base = {"class_labels": labels, "num_inference_steps": 24, "output_type": "np"}
    caches = cache_settings(pipe, is_unet=True)
    modes = guidance_modes(2.0)
    runs = {f"cache={name}, guidance=constant": (cache, modes["constant"]) for name, cache in caches.items()}
    runs |= {f"cache=none, guidance={mode}": (None, call) for mode, call in modes.items() if mode != "constant"}
    accuracy = {
        name: 100 * digit_accuracy(sampler(pipe, cache, {**base, **call})()[..., 0], labels)
        for name, (cache, call) in runs.items()
    }
    timing_call = {**base, "class_labels": list(range(10)) * args.timing_images_per_class}
    seconds = interleaved_median_seconds(
        {name: sampler(pipe, cache, {**timing_call, **call}) for name, (cache, call) in runs.items()},
        args.repeats,
        torch.device("cpu"),
        warmup=0,
    )
    return summarise(runs, seconds, 10 * args.timing_images_per_class, accuracy) | {
        "pipeline": str(pipeline_dir),
        "num_inference_steps": 24,
        "samples_for_accuracy": len(labels),
    }


def bench_diffit_s2(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    denoiser = DiffiTTransformer2DModel.from_preset("DiffiT-S/2").eval()
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=official_scheduler(), **official_recipe(16))
    pipe.set_progress_bar_config(disable=True)
    call = {"class_labels": list(range(args.s2_batch_size)), "num_inference_steps": 8, "output_type": "latent"}
    runs = {name: (cache, {}) for name, cache in cache_settings(pipe, is_unet=False).items()}
    seconds = interleaved_median_seconds(
        {name: sampler(pipe, cache, call) for name, (cache, _) in runs.items()},
        args.s2_repeats,
        torch.device("cpu"),
        warmup=0,
    )
    return summarise(runs, seconds, args.s2_batch_size, None) | {
        "num_inference_steps": 8,
        "guidance": "DiffiT 256px recipe (4.4, power-cosine)",
    }


def summarise(runs: dict, seconds: dict[str, float], images: int, accuracy: dict[str, float] | None) -> dict:
    reference = next(iter(runs))
    results = {}
    for name in runs:
        entry = {
            "images_per_second": round(images / seconds[name], 2),
            "speedup": round(seconds[reference] / seconds[name], 2),
        }
        if accuracy is not None:
            entry["accuracy"] = round(accuracy[name], 1)
            entry["accuracy_drop"] = round(accuracy[reference] - accuracy[name], 1)
        results[name] = entry
    report: dict[str, Any] = {"reference": reference, "settings": results}
    if accuracy is not None:
        passing = [
            name
            for name, entry in results.items()
            if entry["speedup"] >= SPEEDUP_TARGET and entry["accuracy_drop"] <= ACCURACY_DROP_LIMIT
        ]
        report["meets_target"] = sorted(passing, key=lambda name: -results[name]["speedup"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", help="a saved digits pipeline (default: train one as `make demo` does)")
    parser.add_argument("--train_steps", type=int, default=1200)
    parser.add_argument("--samples_per_class", type=int, default=20, help="samples per digit for the accuracy")
    parser.add_argument("--timing_images_per_class", type=int, default=4)
    parser.add_argument("--s2_batch_size", type=int, default=1)
    parser.add_argument("--s2_repeats", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    report = {
        "machine": machine_info(torch.device("cpu")) | {"note": "shared machine: speeds are interleaved medians"},
        "targets": {"speedup": SPEEDUP_TARGET, "accuracy_drop_points": ACCURACY_DROP_LIMIT},
        "digits": bench_digits(args),
        "diffit_s2": bench_diffit_s2(args),
    }
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
