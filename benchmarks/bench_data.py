"""Speed of the training input pipeline: DataLoader workers, and cached latents against encoding on the fly.

Sections (``--sections``):

- ``pipeline``: images/s of the input pipeline (decode, resize, random crop and flip, collate, float conversion) on
  a folder of 256 px JPEGs the benchmark writes, with ``--dataloader_num_workers`` 0 against 2. Each round builds a
  fresh ``ResumableLoader``, takes ``--warmup_batches`` (one pass over the folder: workers started and their queues
  in their steady state) and times the next ``--batches``; rounds alternate between the worker counts and the
  medians are reported, with the CPU milliseconds per image the training process and the workers spent.
- ``step_share``: the share of a training step (tiny image U-Net at ``--step_resolution``) spent waiting for the next
  batch, with 0 and 2 workers: the ``data_wait_share`` the trainer logs.
- ``latents``: latent training images/s with cached latents (``--latents_dataset``) against encoding every batch
  with the VAE, at 256 px with the ``stabilityai/sd-vae-ft-ema`` architecture (random weights: built from its
  config, nothing is downloaded) and DiffiT-S/2; interleaved rounds of one optimiser step each.

    python benchmarks/bench_data.py --output benchmarks/results/cpu-data.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, PartialState
from diffusers import AutoencoderKL
from harness import interleaved_median_seconds, machine_info, write_report
from PIL import Image

from diffit_diffusers.training import DataConfig, ResumableLoader, Trainer, load_training_dataset, parse_config
from diffit_diffusers.training.precompute_latents import main as precompute_latents


# stabilityai/sd-vae-ft-ema's config.json (the SD 1.x VAE), written here so that nothing is downloaded.
SD_VAE_FT_EMA_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 384x256 JPEGs (quality 90) of smooth random colour fields with noise, like photos to a decoder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:256, 0:384] / 256.0
    for index in range(count):
        waves = [np.sin(x * rng.uniform(2, 12) + y * rng.uniform(2, 12) + rng.uniform(0, 6)) for _ in range(3)]
        pixels = (np.stack(waves, -1) * 90 + 128 + rng.normal(0, 12, (256, 384, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return folder


def reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes ``pids`` have used so far, from ``/proc`` (Linux)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pipeline_throughput(folder: Path, args: argparse.Namespace) -> dict:
    worker_counts = (0, 2)
    speed = {workers: [] for workers in worker_counts}
    cpu = {workers: {"training_process": [], "workers": []} for workers in worker_counts}
    images = args.batches * args.batch_size
    for _ in range(args.repeats):
        for workers in worker_counts:
            config = DataConfig(
                train_data_dir=str(folder), resolution=256, center_crop=False, random_flip=True,
                dataloader_num_workers=workers, cache_dir=args.cache_dir,
            )
            loader = ResumableLoader(load_training_dataset(config), args.batch_size, num_workers=workers)
            for _ in range(args.warmup_batches):
                loader.next_batch()
            children = [child.pid for child in multiprocessing.active_children()]
            main_cpu, workers_cpu, start = time.process_time(), cpu_seconds(children), time.perf_counter()
            for _ in range(args.batches):
                loader.next_batch()
            speed[workers].append(images / (time.perf_counter() - start))
            cpu[workers]["training_process"].append((time.process_time() - main_cpu) / images * 1e3)
            cpu[workers]["workers"].append((cpu_seconds(children) - workers_cpu) / images * 1e3)
            del loader
    medians = {workers: statistics.median(values) for workers, values in speed.items()}
    return {
        "images_per_second": {f"workers_{workers}": round(value, 1) for workers, value in medians.items()},
        "speedup_2_workers": round(medians[2] / medians[0], 2),
        "cpu_ms_per_image": {
            f"workers_{workers}": {name: round(statistics.median(values), 3) for name, values in parts.items()}
            for workers, parts in cpu.items()
        },
        "batch_size": args.batch_size,
        "warmup_batches_per_round": args.warmup_batches,
        "batches_timed_per_round": args.batches,
        "rounds": args.repeats,
    }


def step_share(folder: Path, args: argparse.Namespace, work: Path) -> dict:
    results = {}
    for workers in (0, 2):
        reset_accelerate()
        flags = [
            "--train_data_dir", str(folder), "--resolution", str(args.step_resolution), "--center_crop", "false",
            "--random_flip", "true", "--model_config", "tiny", "--train_batch_size", str(args.batch_size),
            "--max_train_steps", "1", "--dataloader_num_workers", str(workers), "--use_ema", "false",
            "--output_dir", str(work / f"share-{workers}"), "--cache_dir", args.cache_dir,
        ]
        trainer = Trainer(parse_config(flags, "bench"))
        data_seconds, step_seconds = [], []
        for index in range(args.steps + 1):
            start = time.perf_counter()
            batch = trainer.loader.next_batch()
            waited = time.perf_counter() - start
            loss = trainer.training_step(batch)
            trainer.accelerator.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if index:  # the first step starts the workers
                data_seconds.append(waited)
                step_seconds.append(time.perf_counter() - start)
        results[f"workers_{workers}"] = {
            "data_wait_share": round(sum(data_seconds) / sum(step_seconds), 3),
            "median_step_seconds": round(statistics.median(step_seconds), 3),
        }
    return {"resolution": args.step_resolution, "batch_size": args.batch_size, "steps": args.steps, **results}


def latent_speed(folder: Path, args: argparse.Namespace, work: Path) -> dict:
    torch.manual_seed(0)
    vae_dir = work / "sd-vae-ft-ema-random"
    AutoencoderKL(**SD_VAE_FT_EMA_CONFIG).save_pretrained(vae_dir)
    latents_dir = work / "latents"
    reset_accelerate()
    start = time.perf_counter()
    subset = str(args.latent_batch_size * (args.latent_repeats + 1))  # the images the timed steps use
    precompute_latents([
        "--train_data_dir", str(folder), "--resolution", "256", "--max_train_samples", subset, "--vae", str(vae_dir),
        "--output_dir", str(latents_dir), "--encode_batch_size", str(args.latent_batch_size),
        "--cache_dir", args.cache_dir,
    ])
    precompute_seconds = time.perf_counter() - start
    common = [
        "--model_config", "DiffiT-S/2", "--objective", "learned_sigma", "--vae", str(vae_dir), "--resolution", "256",
        "--max_train_samples", subset, "--train_batch_size", str(args.latent_batch_size), "--max_train_steps", "1",
        "--use_ema", "false", "--cache_dir", args.cache_dir,
    ]
    trainers = {}
    for name, source in (("on_the_fly", ["--train_data_dir", str(folder)]), ("cached", ["--latents_dataset", str(latents_dir)])):
        reset_accelerate()
        trainers[name] = Trainer(parse_config([*common, *source, "--output_dir", str(work / name)], "bench"))

    def one_step(trainer: Trainer):
        def step():
            batch = trainer.loader.next_batch()
            trainer.accelerator.backward(trainer.training_step(batch))
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        return step

    seconds = interleaved_median_seconds(
        {name: one_step(trainer) for name, trainer in trainers.items()}, args.latent_repeats, torch.device("cpu")
    )
    images_per_second = {name: args.latent_batch_size / value for name, value in seconds.items()}
    return {
        "model": "DiffiT-S/2 (learned sigma) on 4x32x32 latents",
        "vae": "stabilityai/sd-vae-ft-ema architecture, random weights",
        "batch_size": args.latent_batch_size,
        "rounds": args.latent_repeats,
        "images_per_second": {name: round(value, 2) for name, value in images_per_second.items()},
        "median_step_seconds": {name: round(value, 3) for name, value in seconds.items()},
        "speedup_cached": round(images_per_second["cached"] / images_per_second["on_the_fly"], 2),
        "precompute_seconds": round(precompute_seconds, 1),
        "precompute_images": int(subset),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["pipeline", "step_share", "latents"])
    parser.add_argument("--num_images", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--warmup_batches", type=int, default=6)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step_resolution", type=int, default=64)
    parser.add_argument("--latent_batch_size", type=int, default=4)
    parser.add_argument("--latent_repeats", type=int, default=4)
    parser.add_argument(
        "--note",
        default="2-core machine shared with other jobs while measured; see load_average_1min_at_start.",
        help="how the machine was used while measuring, for the report",
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        args.cache_dir = str(work / "hf-cache")
        folder = write_jpegs(work / "jpegs", args.num_images)
        report = {"machine": machine_info(torch.device("cpu"))}
        report["note"] = f"{args.note} torch uses one thread per process (DataLoader workers always do)."
        if "pipeline" in args.sections:
            report["pipeline"] = pipeline_throughput(folder, args)
        if "step_share" in args.sections:
            report["step_share"] = step_share(folder, args, work)
        if "latents" in args.sections:
            report["latents"] = latent_speed(folder, args, work)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
