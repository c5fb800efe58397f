"""Cached VAE latents: the dataset layout `precompute_latents` writes and the training datasets that read it.

A latents dataset is a folder (or a Hub dataset repo) of parquet shards `data/train-NNNNN-of-MMMMM.parquet` plus
`latents_info.json`. Each row holds the VAE posterior of one image, `latent_mean` and `latent_logvar` (float32
`(C, h, w)`), optionally the posterior of the horizontally flipped image (`flipped_latent_mean`,
`flipped_latent_logvar`) and a `label` (`ClassLabel`). Training draws a fresh latent from the posterior at every
step, `z = mean + exp(logvar / 2) * noise` times the VAE's scaling factor, exactly as encoding on the fly does, and
picks the flipped copy with probability 0.5 under `random_flip`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch
from huggingface_hub import hf_hub_download

from ..dataset_sources import looks_like_local_path
from .data import DataConfig, ImageDataset, StreamingImageDataset, prepare_stream


LATENTS_INFO_FILE = "latents_info.json"
LATENT_COLUMNS = ("latent_mean", "latent_logvar")
FLIPPED_PREFIX = "flipped_"
LABEL_COLUMN = "label"
SHARD_PATTERN = "data/train-{index:05d}-of-{count:05d}.parquet"


def read_latents_info(source: str, cache_dir: str | None = None) -> dict[str, Any]:
    """The `latents_info.json` of a latents folder or Hub dataset: VAE, scaling factor, latent shape, resolution,
    number of examples, class names and whether flipped copies are stored."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        info_file = folder / LATENTS_INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(
                f"`latents_dataset` {source!r} has no {LATENTS_INFO_FILE}: it is not (or not yet completely) written "
                "by `python -m diffit_diffusers.training.precompute_latents`; rerun that command to finish it."
            )
        return json.loads(info_file.read_text())
    if looks_like_local_path(source):
        raise FileNotFoundError(f"`latents_dataset` {source!r} looks like a local folder but does not exist.")
    return json.loads(Path(hf_hub_download(source, LATENTS_INFO_FILE, repo_type="dataset", cache_dir=cache_dir)).read_text())


class _LatentExamples:
    """Rows of a latents dataset as `{"latent_mean", "latent_logvar": (C, h, w), "class_labels": ()}` examples."""

    use_flipped: bool = False

    def _example_values(self, row: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        flip = self.use_flipped and float(torch.rand((), generator=generator)) < 0.5
        prefix = FLIPPED_PREFIX if flip else ""
        return {name: torch.as_tensor(row[prefix + name], dtype=torch.float32) for name in LATENT_COLUMNS}


class LatentDataset(_LatentExamples, ImageDataset):
    """Map-style cached latents (see [`ImageDataset`][diffit_diffusers.training.ImageDataset] for indexing, epochs
    and the seeded flips); `latents_info` is the dataset's `latents_info.json`."""


class StreamingLatentDataset(_LatentExamples, StreamingImageDataset):
    """Streamed cached latents, block-shuffled and exactly resumable like
    [`StreamingImageDataset`][diffit_diffusers.training.StreamingImageDataset]."""


def load_latents_dataset(
    config: DataConfig, *, process_index: int = 0, num_processes: int = 1
) -> LatentDataset | StreamingLatentDataset:
    """The cached latents of `config.latents_dataset` (a folder or a Hub dataset id) for process `process_index`.

    `config.label_column` trains class-conditionally on the stored labels (`"label"`); `random_flip` picks the
    flipped copy half of the time (an error if none was stored); `streaming`, `shuffle_buffer_size`, `seed` and
    `max_train_samples` act as for images. Resolution, crop and channel settings were fixed when the latents were
    computed.
    """
    source = config.latents_dataset
    info = read_latents_info(source, config.cache_dir)
    if config.random_flip and not info["random_flip"]:
        raise ValueError(
            f"`random_flip` needs flipped latents, but {source!r} was computed without them; recompute it with "
            "--random_flip or train without flips."
        )
    if config.label_column is not None and config.label_column != LABEL_COLUMN:
        raise ValueError(f"Cached latents keep their labels in column {LABEL_COLUMN!r}; pass --label_column label.")
    if config.label_column is not None and info["class_names"] is None:
        raise ValueError(f"{source!r} holds no labels (computed without --label_column); train unconditionally.")
    folder = Path(source).expanduser()
    load_kwargs = {"split": "train", "streaming": config.streaming, "cache_dir": config.cache_dir}
    if folder.is_dir():
        hf_dataset = datasets.load_dataset("parquet", data_files=str(folder / "data" / "*.parquet"), **load_kwargs)
    else:
        hf_dataset = datasets.load_dataset(source, **load_kwargs)
    columns = [*LATENT_COLUMNS, *(FLIPPED_PREFIX + name for name in LATENT_COLUMNS if info["random_flip"])]
    columns += [LABEL_COLUMN] if config.label_column is not None else []
    hf_dataset = hf_dataset.select_columns(columns).with_format("torch")
    common = {
        "image_column": LATENT_COLUMNS[0],
        "label_column": config.label_column,
        "class_names": info["class_names"] if config.label_column is not None else None,
        "transform": None,
        "seed": config.seed,
        "source_name": f"latents dataset {source!r}",
        "process_index": process_index,
        "num_processes": num_processes,
        "on_unreadable_image": None,
    }
    if config.streaming:
        hf_dataset = prepare_stream(hf_dataset, config, num_processes, common["source_name"])
        dataset = StreamingLatentDataset(hf_dataset, shuffle_buffer_size=config.shuffle_buffer_size, **common)
    else:
        if config.max_train_samples is not None and config.max_train_samples < len(hf_dataset):
            hf_dataset = hf_dataset.shuffle(seed=config.seed).select(range(config.max_train_samples))
        dataset = LatentDataset(hf_dataset, **common)
    dataset.use_flipped = config.random_flip
    dataset.latents_info = info
    return dataset

