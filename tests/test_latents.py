"""Cached latents: precompute_latents (posteriors, flipped copies, shards, resuming, the Hub) and training from them
(the same training as encoding on the fly, streaming, exact resume)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, PartialState
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffit_diffusers import DiffiTPipeline
from diffit_diffusers.training import DataConfig, Trainer, load_training_dataset, normalize_pixels, parse_config
from diffit_diffusers.training.precompute_latents import main as precompute_main

from test_training import TINY_TRANSFORMER, digits_args, run_training, tiny_vae_folder, write_config


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


IMAGES = {"dataset_name": "digits", "label_column": "label", "resolution": "16", "max_train_samples": "60"}


def precompute(tmp_path: Path, output: str = "latents", **extra) -> Path:
    flags = {**IMAGES, "vae": str(tmp_path / "vae"), "output_dir": str(tmp_path / output), "shard_size": "25",
             "encode_batch_size": "8", "cache_dir": str(tmp_path / "cache"), **extra}
    assert precompute_main([word for key, value in flags.items() for word in (f"--{key}", value)]) == 0
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return tmp_path / output


@pytest.fixture
def vae(tmp_path):
    return AutoencoderKL.from_pretrained(tiny_vae_folder(tmp_path))


def test_latents_are_the_vae_posteriors_of_the_training_images(tmp_path, vae):
    folder = precompute(tmp_path, random_flip="true")
    info = json.loads((folder / "latents_info.json").read_text())
    assert info["num_examples"] == 60 and info["latent_shape"] == [4, 8, 8] and info["random_flip"]
    assert sorted(path.name for path in (folder / "data").iterdir()) == [
        f"train-0000{index}-of-00003.parquet" for index in range(3)
    ]
    card = (folder / "README.md").read_text()
    assert "diffit" in yaml.safe_load(card.split("---")[1])["tags"] and "--latents_dataset" in card

    images = load_training_dataset(DataConfig(**{**IMAGES, "resolution": 16, "max_train_samples": 60}, cache_dir=str(tmp_path / "cache")))
    latents = load_training_dataset(
        DataConfig(latents_dataset=str(folder), label_column="label", cache_dir=str(tmp_path / "cache"))
    )
    for index in (0, 31, 59):
        pixels = normalize_pixels(images[index]["pixel_values"])[None]
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            flipped = vae.encode(pixels.flip(-1)).latent_dist
        row = latents.hf_dataset[index]
        torch.testing.assert_close(row["latent_mean"][None], posterior.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row["latent_logvar"][None], posterior.logvar, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row["flipped_latent_mean"][None], flipped.mean, atol=1e-5, rtol=1e-4)
        assert latents[index]["class_labels"] == images[index]["class_labels"]
    assert latents.id2label == images.id2label


def test_an_interrupted_precompute_finishes_only_the_missing_shards(tmp_path, vae):
    folder = precompute(tmp_path)
    shards = sorted((folder / "data").iterdir())
    written = {path.name: path.stat().st_mtime_ns for path in shards}
    original = shards[1].read_bytes()
    shards[1].unlink()
    (folder / "latents_info.json").unlink()  # as after a kill: the info file is written last
    with pytest.raises(FileNotFoundError, match="not .or not yet completely. written"):
        load_training_dataset(DataConfig(latents_dataset=str(folder)))
    precompute(tmp_path)
    assert shards[1].read_bytes() == original
    assert {path.name: path.stat().st_mtime_ns for path in (shards[0], shards[2])} == {
        name: written[name] for name in (shards[0].name, shards[2].name)
    }


def latent_args(tmp_path: Path, output: str, **overrides) -> list[str]:
    options = {
        "model_config": write_config(tmp_path, TINY_TRANSFORMER, "transformer"), "objective": "epsilon",
        "vae": str(tmp_path / "vae"), "resolution": 16, "num_channels": 3, "max_train_samples": 60,
        "max_train_steps": 2, "checkpointing_steps": 2, "cache_dir": str(tmp_path / "cache"),
    }
    return digits_args(tmp_path, output=output, **{**options, **overrides})


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "denoiser" / "diffusion_pytorch_model.safetensors")


def trained_latents(args: list[str]) -> tuple[list[torch.Tensor], Path]:
    """Train with these flags; the clean latents the objective saw at every step, and the output folder."""
    trainer = Trainer(parse_config(args, "test"))
    seen = []
    loss = trainer.objective.loss

    def recording_loss(model, clean, class_labels):
        seen.append(clean.detach().clone())
        return loss(model, clean, class_labels)

    trainer.objective.loss = recording_loss
    return seen, trainer.train()


def test_training_on_cached_latents_matches_encoding_on_the_fly(tmp_path, vae):
    folder = precompute(tmp_path)
    on_the_fly, _ = trained_latents(latent_args(tmp_path, "on-the-fly"))
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    cached_args = latent_args(tmp_path, "cached", latents_dataset=str(folder))
    del cached_args[cached_args.index("--dataset_name") : cached_args.index("--dataset_name") + 2]
    cached, cached_dir = trained_latents(cached_args)
    # The same examples in the same order, the same posteriors and the same noise: the same latents, up to the
    # rounding of encoding in batches of 8 instead of 4.
    assert len(cached) == len(on_the_fly) == 2
    for step_cached, step_on_the_fly in zip(cached, on_the_fly):
        torch.testing.assert_close(step_cached, step_on_the_fly, atol=1e-5, rtol=1e-4)
    pipe = DiffiTPipeline.from_pretrained(cached_dir)
    assert pipe.vae is not None and pipe.denoiser.config.sample_size == 8 and pipe.denoiser.config.in_channels == 4


@pytest.mark.parametrize("streaming", [False, True])
def test_training_on_cached_latents_resumes_exactly(tmp_path, vae, streaming):
    folder = precompute(tmp_path, random_flip="true")

    def args(output, steps, **extra):
        flags = latent_args(
            tmp_path, output, latents_dataset=str(folder), random_flip=True, streaming=streaming,
            shuffle_buffer_size=16, max_train_steps=steps, **extra,
        )
        del flags[flags.index("--dataset_name") : flags.index("--dataset_name") + 2]
        del flags[flags.index("--max_train_samples") : flags.index("--max_train_samples") + 2]
        return flags

    straight = final_weights(run_training(args("straight", 4)))
    for steps, extra in ((2, {}), (4, {"resume_from_checkpoint": "latest"})):
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        resumed_dir = run_training(args("resumed", steps, **extra))
    resumed = final_weights(resumed_dir)
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_latents_dataset_errors_are_clear(tmp_path, vae):
    folder = precompute(tmp_path)
    with pytest.raises(ValueError, match="recompute it with --random_flip"):
        load_training_dataset(DataConfig(latents_dataset=str(folder), random_flip=True))
    with pytest.raises(ValueError, match="only one of them"):
        DataConfig(dataset_name="digits", latents_dataset=str(folder))
    other_vae = tmp_path / "other-vae"
    AutoencoderKL(latent_channels=2, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(other_vae)
    flags = latent_args(tmp_path, "mismatch", latents_dataset=str(folder), vae=str(other_vae))
    del flags[flags.index("--dataset_name") : flags.index("--dataset_name") + 2]
    with pytest.raises(ValueError, match="is not the VAE the latents were encoded with"):
        run_training(flags)


def test_precomputed_latents_push_to_the_hub_as_a_dataset(tmp_path, vae, hub_server):
    precompute(tmp_path, push_to_hub="true", hub_dataset_id="tester/digit-latents")
    files = hub_server.files("tester/digit-latents", repo_type="dataset")
    assert {"README.md", "latents_info.json", "data/train-00000-of-00003.parquet"} <= set(files)
    assert not any(name.startswith(".") for name in files)


@pytest.mark.slow
def test_two_processes_share_the_shards_and_write_the_same_latents(tmp_path, vae):
    single = precompute(tmp_path, output="single")
    flags = {**IMAGES, "vae": str(tmp_path / "vae"), "output_dir": str(tmp_path / "double"), "shard_size": "25",
             "encode_batch_size": "8", "cache_dir": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffit_diffusers.training.precompute_latents",
        *[word for key, value in flags.items() for word in (f"--{key}", value)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for shard in sorted((single / "data").iterdir()):
        double = datasets.Dataset.from_parquet(str(tmp_path / "double" / "data" / shard.name)).with_format("torch")
        expected = datasets.Dataset.from_parquet(str(shard)).with_format("torch")
        torch.testing.assert_close(double["latent_mean"], expected["latent_mean"], atol=1e-5, rtol=1e-4)
    assert json.loads((tmp_path / "double" / "latents_info.json").read_text())["num_examples"] == 60
