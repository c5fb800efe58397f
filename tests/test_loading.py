"""DiffiTPipeline.from_pretrained through diffusers' own loader: every keyword, locally and through the fake Hub,
folders of version 0.1.0, the generic remote-code loader, no warnings, clear errors."""

import json
import logging
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, QuantoConfig
from diffusers.quantizers import PipelineQuantizationConfig
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.hub import push_folder_to_hub

from test_pipeline import image_pipeline, latent_pipeline, randomise, sample


LEGACY_FOLDER = Path(__file__).parent / "fixtures" / "diffit-0.1.0-pipeline"
REPO_ID = "tester/tiny-diffit"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A latent pipeline saved twice, in float32 and as an ``fp16`` variant, with its reference samples."""
    pipe = latent_pipeline(id2label={i: f"class {i}" for i in range(5)}, default_guidance_scale=2.0)
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    pipe.save_pretrained(folder, variant="fp16")
    return pipe, folder, sample(pipe)


def quiet_loaded(pipe: DiffiTPipeline) -> DiffiTPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    theirs = second.state_dict()
    return all(torch.equal(value.float(), theirs[key].float()) for key, value in first.state_dict().items())


def test_saved_index_names_the_installed_library(saved):
    _, folder, _ = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffit", "DiffiTPipeline"]
    assert index["denoiser"] == ["diffit_diffusers", "DiffiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    reexport = (folder / "denoiser" / "diffit_diffusers.py").read_text()
    assert "from diffit_diffusers import DiffiTTransformer2DModel" in reexport
    assert (folder / "denoiser" / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_variant_round_trip(saved, tmp_path):
    pipe, _, expected = saved
    variant_only = tmp_path / "variant-only"
    pipe.save_pretrained(variant_only, variant="ema")
    assert sorted(path.name for path in (variant_only / "denoiser").glob("*.safetensors")) == [
        "diffusion_pytorch_model.ema.safetensors"
    ]
    loaded = quiet_loaded(DiffiTPipeline.from_pretrained(variant_only, variant="ema"))
    np.testing.assert_array_equal(sample(loaded), expected)
    with pytest.raises(ValueError, match="variant=fp16"):
        DiffiTPipeline.from_pretrained(variant_only, variant="fp16")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"variant": "fp16"},
        {"use_safetensors": True},
        {"low_cpu_mem_usage": False},
        {"device_map": "cpu"},
        {"torch_dtype": torch.float32},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_loading_keywords_give_identical_samples(saved, kwargs):
    _, folder, expected = saved
    loaded = quiet_loaded(DiffiTPipeline.from_pretrained(folder, **kwargs))
    assert type(loaded) is DiffiTPipeline and type(loaded.denoiser) is DiffiTTransformer2DModel
    np.testing.assert_array_equal(sample(loaded), expected)
    assert loaded.get_label_ids("class 3") == [3] and loaded.config.default_guidance_scale == 2.0


def test_pickle_weights_with_use_safetensors_false(saved, tmp_path):
    pipe, _, expected = saved
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "denoiser" / "diffusion_pytorch_model.bin").is_file()
    loaded = quiet_loaded(DiffiTPipeline.from_pretrained(tmp_path, use_safetensors=False))
    np.testing.assert_array_equal(sample(loaded), expected)
    with pytest.raises(OSError, match="safetensors"):
        DiffiTPipeline.from_pretrained(tmp_path, use_safetensors=True)


def test_per_component_dtype(saved):
    _, folder, _ = saved
    loaded = DiffiTPipeline.from_pretrained(folder, dtype={"denoiser": torch.bfloat16, "default": torch.float16})
    assert loaded.denoiser.dtype == torch.bfloat16 and loaded.vae.dtype == torch.float16
    loaded = DiffiTPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert loaded.denoiser.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16


def test_component_and_argument_overrides(saved):
    _, folder, _ = saved
    other = randomise(
        DiffiTTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            num_classes=5,
        ),
        seed=7,
    )
    scheduler = DDIMScheduler()
    loaded = DiffiTPipeline.from_pretrained(
        folder, denoiser=other, scheduler=scheduler, vae=None, default_guidance_scale=3.5
    )
    assert loaded.denoiser is other and loaded.scheduler is scheduler and loaded.vae is None
    assert loaded.config.default_guidance_scale == 3.5
    assert loaded.get_label_ids("class 1") == [1]
    with pytest.raises(ValueError, match="should be"):
        DiffiTPipeline.from_pretrained(folder, denoiser=torch.nn.Linear(2, 2))


def test_quantization_config_quantizes_the_denoiser(saved):
    pipe, folder, _ = saved
    config = PipelineQuantizationConfig(quant_mapping={"denoiser": QuantoConfig(weights_dtype="int8")})
    loaded = DiffiTPipeline.from_pretrained(folder, quantization_config=config)
    assert type(loaded.denoiser.proj_out).__name__ == "QLinear"
    assert type(loaded.vae.decoder.conv_out) is torch.nn.Conv2d  # only the named component is quantized
    latents, timesteps, labels = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 4])
    with torch.no_grad():
        reference = pipe.denoiser(latents, timesteps, labels).sample
        quantized = loaded.denoiser(latents, timesteps, labels).sample
    # int8 weights with per-channel scales: within 2% of the output scale.
    assert (quantized - reference).abs().max() <= 0.02 * reference.abs().max()


def test_normal_load_logs_no_warnings(saved):
    _, folder, _ = saved
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    diffusers_logger = diffusers_logging.get_logger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        DiffiTPipeline.from_pretrained(folder)
        DiffiTPipeline.from_pretrained(LEGACY_FOLDER)
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    finally:
        diffusers_logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == []


def test_generic_loader_with_remote_code(saved):
    _, folder, expected = saved
    generic = quiet_loaded(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, variant="fp16"))
    assert type(generic) is DiffiTPipeline and type(generic.denoiser) is DiffiTTransformer2DModel
    np.testing.assert_array_equal(sample(generic), expected)


def test_image_pipeline_round_trip(tmp_path):
    pipe = image_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = quiet_loaded(DiffiTPipeline.from_pretrained(tmp_path))
    assert type(loaded.denoiser) is DiffiTUNet2DModel
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


def test_folder_saved_by_version_0_1_0_loads_with_both_loaders(tmp_path):
    index = json.loads((LEGACY_FOLDER / "model_index.json").read_text())
    assert index["denoiser"] == ["modeling_diffit", "DiffiTTransformer2DModel"]
    ours = quiet_loaded(DiffiTPipeline.from_pretrained(LEGACY_FOLDER))
    generic = quiet_loaded(DiffusionPipeline.from_pretrained(LEGACY_FOLDER, trust_remote_code=True))
    assert type(generic) is DiffiTPipeline
    saved_weights = load_file(LEGACY_FOLDER / "denoiser" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(ours.denoiser.proj_out.weight, saved_weights["proj_out.weight"])
    assert ours.get_label_ids("two") == [2] and ours.config.default_num_inference_steps == 3
    images = sample(ours, class_labels=[0, 2], guidance_scale=2.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, sample(generic, class_labels=[0, 2], guidance_scale=2.0))

    ours.save_pretrained(tmp_path)  # re-saving writes the current format
    assert json.loads((tmp_path / "model_index.json").read_text())["denoiser"][0] == "diffit_diffusers"
    assert weights_equal(DiffiTPipeline.from_pretrained(tmp_path).denoiser, ours.denoiser)


def test_hub_loading_keywords(saved, tmp_path, hub_server):
    _, folder, expected = saved
    push_folder_to_hub(folder, REPO_ID)
    first_commit = hub_server.commits(REPO_ID)[-1].oid
    changed = latent_pipeline(id2label={i: f"class {i}" for i in range(5)}, default_guidance_scale=9.0)
    changed.save_pretrained(tmp_path / "changed")
    push_folder_to_hub(tmp_path / "changed", REPO_ID, commit_message="Second version")
    cache = tmp_path / "cache"

    loaded = DiffiTPipeline.from_pretrained(
        REPO_ID, revision=first_commit, cache_dir=cache, token="hf_fake", variant="fp16", dtype=torch.float32
    )
    np.testing.assert_array_equal(sample(quiet_loaded(loaded)), expected)
    assert loaded.config.default_guidance_scale == 2.0
    assert loaded.name_or_path == REPO_ID
    resolve_requests = [request for request in hub_server.requests if "/resolve/" in request.path]
    assert all(request.headers["authorization"] == "Bearer hf_fake" for request in resolve_requests)
    downloaded = {request.path.split("/resolve/")[1].split("/", 1)[1] for request in resolve_requests}
    weights = [f"{component}/diffusion_pytorch_model" for component in ("denoiser", "vae")]
    assert {f"{name}.fp16.safetensors" for name in weights} <= downloaded  # the variant's weights only
    assert not {f"{name}.safetensors" for name in weights} & downloaded

    assert DiffiTPipeline.from_pretrained(REPO_ID, cache_dir=cache).config.default_guidance_scale == 9.0
    requests_before = len(hub_server.requests)
    offline = DiffiTPipeline.from_pretrained(
        REPO_ID, revision=first_commit, cache_dir=cache, local_files_only=True, variant="fp16", device_map="cpu"
    )
    assert len(hub_server.requests) == requests_before
    np.testing.assert_array_equal(sample(quiet_loaded(offline)), expected)
    with pytest.MonkeyPatch.context() as patch:  # HF_HUB_OFFLINE=1 reads the same files from the cache
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        env_offline = DiffiTPipeline.from_pretrained(REPO_ID, revision=first_commit, cache_dir=cache, variant="fp16")
    assert len(hub_server.requests) == requests_before
    np.testing.assert_array_equal(sample(quiet_loaded(env_offline)), expected)

    scheduler = DDIMScheduler()
    requests_before = len(hub_server.requests)
    without_vae = DiffiTPipeline.from_pretrained(
        REPO_ID, cache_dir=tmp_path / "cache-2", vae=None, scheduler=scheduler, use_safetensors=True,
        low_cpu_mem_usage=False, force_download=True,
    )
    assert without_vae.vae is None and without_vae.scheduler is scheduler
    new_paths = [request.path for request in hub_server.requests[requests_before:]]
    assert any("/denoiser/" in path for path in new_paths)
    assert not any("/vae/" in path or "/scheduler/" in path for path in new_paths)  # passed components: no download
    assert not any(".fp16." in path for path in new_paths)  # no variant asked for: no variant files

    generic = DiffusionPipeline.from_pretrained(
        REPO_ID, revision=first_commit, cache_dir=tmp_path / "cache-3", trust_remote_code=True
    )
    np.testing.assert_array_equal(sample(quiet_loaded(generic)), expected)


def test_legacy_folder_from_the_hub(tmp_path, hub_server):
    push_folder_to_hub(LEGACY_FOLDER, "tester/legacy")
    loaded = quiet_loaded(DiffiTPipeline.from_pretrained("tester/legacy", cache_dir=tmp_path / "cache"))
    local = quiet_loaded(DiffiTPipeline.from_pretrained(LEGACY_FOLDER))
    np.testing.assert_array_equal(sample(loaded, class_labels=[1]), sample(local, class_labels=[1]))


def test_broken_model_index_is_a_clear_error(saved, tmp_path, hub_server):
    _, folder, _ = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model_index.json").write_text('{"_class_name": ["pipeline_diffit", "DiffiTPipeline"],')
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON .*save_pretrained"):
        DiffiTPipeline.from_pretrained(broken)
    push_folder_to_hub(broken, "tester/broken")
    with pytest.raises(ValueError, match=r"model_index.json is not valid JSON"):
        DiffiTPipeline.from_pretrained("tester/broken", cache_dir=tmp_path / "cache")
    (broken / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a pipeline index"):
        DiffiTPipeline.from_pretrained(broken)


def test_folder_of_another_pipeline_names_its_class(tmp_path):
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds a DiTPipeline, not a DiffiTPipeline"):
        DiffiTPipeline.from_pretrained(tmp_path)


def test_raw_checkpoint_folder_and_repo_point_at_from_single_file(tmp_path, hub_server):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "diffit_256.safetensors").write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match=r"diffit_256.safetensors.*from_single_file"):
        DiffiTPipeline.from_pretrained(folder)
    hub_server.seed_repo("nvidia/DiffiT", {"diffit_256.safetensors": b"weights", "README.md": b"# DiffiT\n"})
    with pytest.raises(FileNotFoundError, match=r"nvidia/DiffiT has no model_index.json.*from_single_file"):
        DiffiTPipeline.from_pretrained("nvidia/DiffiT", cache_dir=tmp_path / "cache")


def test_push_to_hub_through_save_pretrained_is_refused(saved, tmp_path):
    pipe, _, _ = saved
    with pytest.raises(ValueError, match=r"pipeline.push_to_hub\(repo_id\)"):
        pipe.save_pretrained(tmp_path, push_to_hub=True)
