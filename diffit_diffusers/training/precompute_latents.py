"""Encode a dataset once with a VAE into cached latents for latent DiffiT training.

    accelerate launch -m diffit_diffusers.training.precompute_latents --dataset_name imagenet-1k \
        --label_column label --resolution 256 --random_flip --vae stabilityai/sd-vae-ft-ema --output_dir in1k-latents

Train from the result with ``examples/train_latent_diffit.py --latents_dataset in1k-latents``. The images are
resized and center-cropped as for training (no random crops: those would be frozen into the cache), encoded in
batches, and each image's posterior (mean and log-variance) is stored, so training still samples a fresh latent at
every step; ``--random_flip`` also stores the posterior of the flipped image. Shards are split over the accelerate
processes; a shard is written to a temporary file and renamed when complete, so an interrupted run continues where
it stopped when started again with the same flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from transformers import HfArgumentParser

from .data import DataConfig, _option as option, collate_examples, load_training_dataset, normalize_pixels
from .latents import FLIPPED_PREFIX, LABEL_COLUMN, LATENT_COLUMNS, LATENTS_INFO_FILE, SHARD_PATTERN
from .trainer import has_accelerator, load_vae


@dataclass
class LatentCachingOptions:
    """How `precompute_latents` encodes (the images themselves are described by a `DataConfig`)."""

    vae: str = option("stabilityai/sd-vae-ft-ema", "AutoencoderKL folder or Hub id to encode with")
    output_dir: str = option("latents", "folder of the latents dataset (parquet shards and latents_info.json)")
    encode_batch_size: int = option(32, "images per VAE forward pass")
    shard_size: int = option(1000, "examples per parquet shard (the unit of resuming and of splitting over processes)")
    cpu: bool = option(False, "encode on the CPU even when a GPU is available")
    push_to_hub: bool = option(False, "push the latents dataset, with a dataset card, to the Hub")
    hub_dataset_id: str | None = option(None, "Hub dataset repo id (default: the output folder's name)")
    hub_token: str | None = option(None, "Hub token (default: the logged-in one)")
    hub_private_repo: bool = option(False, "create the Hub dataset repo as private")

    def __post_init__(self):
        for name in ("encode_batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")


def _features(latent_shape: tuple[int, int, int], random_flip: bool, class_names: list[str] | None) -> datasets.Features:
    names = [*LATENT_COLUMNS, *(FLIPPED_PREFIX + name for name in LATENT_COLUMNS if random_flip)]
    features = {name: datasets.Array3D(shape=latent_shape, dtype="float32") for name in names}
    if class_names is not None:
        features[LABEL_COLUMN] = datasets.ClassLabel(names=class_names)
    return datasets.Features(features)


def _write_card(folder: Path, info: dict, repo_id: str | None) -> None:
    source = info["source"]
    card_data = DatasetCardData(
        tags=["diffit", "latents", "diffusers"], source_datasets=[source] if source else None, license="other"
    )
    flips = "and of its horizontally flipped copy " if info["random_flip"] else ""
    load = f"--latents_dataset {repo_id or folder.as_posix()}"
    text = (
        f"---\n{card_data.to_yaml()}\n---\n\n# Cached VAE latents of {source}\n\n"
        f"{info['num_examples']} images at {info['resolution']} px, encoded with the VAE `{info['vae']}` "
        f"(scaling factor {info['scaling_factor']}). Each row holds the posterior (`latent_mean`, `latent_logvar`, "
        f"float32 {tuple(info['latent_shape'])}) of one image {flips}"
        f"{'and its `label`' if info['class_names'] else ''}; training samples a fresh latent from it every step.\n\n"
        "Written by `python -m diffit_diffusers.training.precompute_latents`; train a latent DiffiT on it with\n\n"
        f"```bash\naccelerate launch examples/train_latent_diffit.py {load} --vae {info['vae']} --output_dir diffit\n```\n"
    )
    DatasetCard(text).save(folder / "README.md")


def compute_latents_dataset(data: DataConfig, options: LatentCachingOptions) -> Path:
    """Encode the images `data` describes into a latents dataset in `options.output_dir`; returns that folder.

    Run it under `accelerate launch` to split the shards over processes; rerun it to finish an interrupted run.
    """
    if data.latents_dataset is not None or data.streaming:
        raise ValueError("precompute_latents reads images from a map-style dataset; drop --latents_dataset/--streaming.")
    state = PartialState(cpu=options.cpu or not has_accelerator())
    output_dir = Path(options.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {str(output_dir)!r} is a file; pass a folder.")
    vae = load_vae(options.vae).to(state.device)
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)
    if data.resolution % downscale:
        raise ValueError(f"`resolution` ({data.resolution}) must be divisible by the VAE's downscale factor {downscale}.")
    images = load_training_dataset(dataclasses.replace(data, random_flip=False))
    latent_shape = (vae.config.latent_channels, data.resolution // downscale, data.resolution // downscale)
    class_names = None if images.id2label is None else [images.id2label[i] for i in range(images.num_classes)]
    features = _features(latent_shape, data.random_flip, class_names)
    num_shards = math.ceil(len(images) / options.shard_size)

    for shard in range(state.process_index, num_shards, state.num_processes):
        path = output_dir / SHARD_PATTERN.format(index=shard, count=num_shards)
        if path.is_file():
            continue
        keys = [(0, index) for index in range(shard * options.shard_size, min(len(images), (shard + 1) * options.shard_size))]
        loader = torch.utils.data.DataLoader(
            images, sampler=keys, batch_size=options.encode_batch_size, num_workers=data.dataloader_num_workers,
            collate_fn=collate_examples,
        )
        columns = defaultdict(list)
        for batch in loader:
            pixels = normalize_pixels(batch["pixel_values"].to(state.device)).to(vae.dtype)
            views = {"": pixels, FLIPPED_PREFIX: pixels.flip(-1)} if data.random_flip else {"": pixels}
            with torch.no_grad():
                for prefix, view in views.items():
                    posterior = vae.encode(view).latent_dist
                    columns[prefix + LATENT_COLUMNS[0]] += list(posterior.mean.float().cpu().numpy())
                    columns[prefix + LATENT_COLUMNS[1]] += list(posterior.logvar.float().cpu().numpy())
            if class_names is not None:
                columns[LABEL_COLUMN] += batch["class_labels"].tolist()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        datasets.Dataset.from_dict(dict(columns), features=features).to_parquet(str(partial))
        os.replace(partial, path)
    state.wait_for_everyone()
    if state.is_main_process:
        info = {
            "vae": options.vae,
            "scaling_factor": vae.config.scaling_factor,
            "shift_factor": getattr(vae.config, "shift_factor", None),
            "latent_shape": list(latent_shape),
            "resolution": data.resolution,
            "num_channels": data.num_channels,
            "num_examples": len(images),
            "num_shards": num_shards,
            "class_names": class_names,
            "random_flip": data.random_flip,
            "source": data.dataset_name or data.train_data_dir,
        }
        repo_id = None
        if options.push_to_hub:
            api = HfApi(token=options.hub_token)
            repo_id = options.hub_dataset_id or output_dir.resolve().name
            repo_id = api.create_repo(repo_id, repo_type="dataset", private=options.hub_private_repo, exist_ok=True).repo_id
        _write_card(output_dir, info, repo_id)
        (output_dir / LATENTS_INFO_FILE).write_text(json.dumps(info, indent=2))
        if repo_id is not None:
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=output_dir, ignore_patterns=[".*"])
    state.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m diffit_diffusers.training.precompute_latents`` (0 on success, 1 on an error)."""
    parser = HfArgumentParser((DataConfig, LatentCachingOptions), description=__doc__.splitlines()[0])
    try:
        data, options = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    try:
        output_dir = compute_latents_dataset(data, options)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if PartialState().is_main_process:
        print(f"Saved the latents dataset to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
