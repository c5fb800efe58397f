"""from_single_file on NVIDIA-format checkpoints: local files, hf:// URIs and Hub URLs (fake Hub), the pipeline built
around them, diffusers' keyword behaviour and clear errors."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel
from diffit_diffusers.loaders import CheckpointConversionError

from test_convert_nvlabs import (
    SHAPES,
    assert_matches_official,
    make_official,
    official_state_dict,
    random_inputs,
    save_safetensors,
    save_tiny_vae,
)


REPO_ID = "nvidia/DiffiT"


@pytest.fixture(scope="module")
def official():
    return make_official()


@pytest.fixture
def checkpoint(official, tmp_path):
    return save_safetensors(official, tmp_path / "diffit_256.safetensors")


def test_local_file_matches_the_official_forward(official, checkpoint):
    model = DiffiTTransformer2DModel.from_single_file(checkpoint)
    assert not model.training and model.dtype == torch.float32
    assert_matches_official(model, official)


def test_state_dict_and_plain_torch_file(official, tmp_path):
    assert_matches_official(DiffiTTransformer2DModel.from_single_file(official_state_dict(official)), official)
    path = tmp_path / "diffit.pt"
    torch.save(official_state_dict(official), path)
    assert_matches_official(DiffiTTransformer2DModel.from_single_file(str(path)), official)


def test_torch_dtype_and_dtype_alias(official, checkpoint):
    model = DiffiTTransformer2DModel.from_single_file(checkpoint, torch_dtype=torch.bfloat16)
    assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
    assert DiffiTTransformer2DModel.from_single_file(checkpoint, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="torch.dtype"):
        DiffiTTransformer2DModel.from_single_file(checkpoint, torch_dtype="bfloat16")


def test_config_overrides_and_config_folder(official, checkpoint, tmp_path):
    model = DiffiTTransformer2DModel.from_single_file(checkpoint, class_dropout_prob=0.2)
    assert model.config.class_dropout_prob == 0.2
    assert_matches_official(model, official)
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['variant'\]"):
        DiffiTTransformer2DModel.from_single_file(checkpoint, variant="fp16")
    with pytest.raises(CheckpointConversionError, match="shape mismatches"):
        DiffiTTransformer2DModel.from_single_file(checkpoint, mlp_ratio=2.0)

    pipeline_folder = tmp_path / "pipeline"
    DiffiTTransformer2DModel.from_single_file(checkpoint, class_dropout_prob=0.25).save_pretrained(
        pipeline_folder / "denoiser"
    )
    from_config = DiffiTTransformer2DModel.from_single_file(checkpoint, config=pipeline_folder, subfolder="denoiser")
    assert from_config.config.class_dropout_prob == 0.25
    assert_matches_official(from_config, official)


@pytest.mark.parametrize("form", ["hf_uri", "hf_uri_at_revision", "blob_url_at_revision", "hf_co_url"])
def test_hub_files_through_huggingface_hub(official, checkpoint, tmp_path, hub_server, form):
    first = hub_server.seed_repo(REPO_ID, {"diffit_256.safetensors": checkpoint.read_bytes()})
    hub_server.seed_repo(REPO_ID, {"diffit_256.safetensors": official_state_bytes(make_official(seed=3), tmp_path)})
    link = {
        "hf_uri": f"hf://{REPO_ID}/diffit_256.safetensors",
        "hf_uri_at_revision": f"hf://{REPO_ID}@{first}/diffit_256.safetensors",
        "blob_url_at_revision": f"https://huggingface.co/{REPO_ID}/blob/{first}/diffit_256.safetensors",
        "hf_co_url": f"hf.co/{REPO_ID}/blob/main/diffit_256.safetensors",
    }[form]
    cache = tmp_path / "cache"
    model = DiffiTTransformer2DModel.from_single_file(link, cache_dir=cache, token="hf_fake")
    if form in ("hf_uri_at_revision", "blob_url_at_revision"):
        assert_matches_official(model, official)
    else:  # the newest commit holds another model
        assert_matches_official(model, make_official(seed=3))
    assert all(
        request.headers["authorization"] == "Bearer hf_fake"
        for request in hub_server.requests
        if "/resolve/" in request.path
    )
    requests = len(hub_server.requests)
    cached = DiffiTTransformer2DModel.from_single_file(link, cache_dir=cache, local_files_only=True)
    assert len(hub_server.requests) == requests
    assert torch.equal(cached.proj_out.weight, model.proj_out.weight)


def official_state_bytes(official, tmp_path):
    return save_safetensors(official, tmp_path / "other.safetensors").read_bytes()


def test_revision_keyword_for_a_uri_without_one(official, checkpoint, tmp_path, hub_server):
    first = hub_server.seed_repo(REPO_ID, {"diffit_256.safetensors": checkpoint.read_bytes()})
    hub_server.seed_repo(REPO_ID, {"diffit_256.safetensors": official_state_bytes(make_official(seed=3), tmp_path)})
    model = DiffiTTransformer2DModel.from_single_file(
        f"hf://{REPO_ID}/diffit_256.safetensors", revision=first, cache_dir=tmp_path / "cache"
    )
    assert_matches_official(model, official)


@pytest.mark.parametrize("shape, scale, schedule", [("256px", 4.4, "power_cosine"), ("512px", 1.49, "constant")])
def test_pipeline_from_single_file_builds_the_released_setup(tmp_path, shape, scale, schedule):
    official = make_official(**SHAPES[shape])
    checkpoint = save_safetensors(official, tmp_path / "diffit.safetensors")
    pipe = DiffiTPipeline.from_single_file(checkpoint, vae=str(save_tiny_vae(tmp_path)))
    assert_matches_official(pipe.denoiser, official)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.variance_type == "learned_range"
    config = pipe.config
    assert (config.default_num_inference_steps, config.default_guided_channels) == (250, 3)
    assert (config.default_guidance_scale, config.default_guidance_schedule) == (scale, schedule)
    assert config.id2label is None  # 10 classes: no ImageNet names
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    side = SHAPES[shape]["input_size"] * 2
    assert images.shape == (1, side, side, 3) and np.isfinite(images).all()


def test_pipeline_from_single_file_options(official, checkpoint, tmp_path, hub_server):
    hub_server.seed_repo(REPO_ID, {"diffit_256.safetensors": checkpoint.read_bytes()})
    vae = AutoencoderKL.from_pretrained(save_tiny_vae(tmp_path))
    scheduler = DDIMScheduler()
    pipe = DiffiTPipeline.from_single_file(
        f"https://huggingface.co/{REPO_ID}/blob/main/diffit_256.safetensors",
        vae=vae,
        scheduler=scheduler,
        torch_dtype=torch.bfloat16,
        cache_dir=tmp_path / "cache",
        default_guidance_scale=2.0,
        id2label={i: f"class {i}" for i in range(10)},
    )
    assert pipe.vae is vae and pipe.scheduler is scheduler and pipe.denoiser.dtype == torch.bfloat16
    assert pipe.config.default_guidance_scale == 2.0 and pipe.get_label_ids("class 4") == [4]

    latents_only = DiffiTPipeline.from_single_file(checkpoint)
    assert latents_only.vae is None
    latents_only.set_progress_bar_config(disable=True)
    latent = latents_only(class_labels=[1], num_inference_steps=2, output_type="latent").images
    assert latent.shape == (1, 4, 32, 32)

    latents, timesteps, labels = random_inputs(official)
    saved = tmp_path / "saved"
    latents_only.save_pretrained(saved)
    reloaded = DiffiTPipeline.from_pretrained(saved)
    with torch.no_grad():
        expected = latents_only.denoiser(latents, timesteps, labels).sample
        assert torch.equal(reloaded.denoiser(latents, timesteps, labels).sample, expected)


def test_clear_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a Hub file URL"):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="does not name a file"):
        DiffiTTransformer2DModel.from_single_file(f"hf://{REPO_ID}")
    with pytest.raises(CheckpointConversionError, match="8 latent channels but the transformer expects 4"):
        DiffiTPipeline.from_single_file(checkpoint, vae=save_tiny_vae(tmp_path, latent_channels=8))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointConversionError, match="extension"):
        DiffiTTransformer2DModel.from_single_file(tmp_path / "weights.npz")
