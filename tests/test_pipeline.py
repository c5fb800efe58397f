"""DiffiTPipeline: sampling with every scheduler, guidance, determinism, save/load and Hub round trips, errors."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.hub import push_folder_to_hub
from diffit_diffusers.models.denoiser import DenoiserParameterization
from diffit_diffusers.pipelines.guidance import apply_guidance, guidance_weight


def randomise(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def latent_pipeline(scheduler=None, **kwargs):
    denoiser = randomise(
        DiffiTTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            num_classes=5, learn_sigma=True,
        )
    )
    scheduler = scheduler or DDPMScheduler(variance_type="learned_range")
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=scheduler, vae=tiny_vae(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_pipeline(scheduler=None, learn_sigma=False, **kwargs):
    denoiser = randomise(
        DiffiTUNet2DModel(
            sample_size=8, in_channels=3, learn_sigma=learn_sigma, block_out_channels=(16, 32), layers_per_block=1,
            window_size=4, attention_head_dim=8, norm_num_groups=8, time_embed_dim=32, num_classes=5,
            class_dropout_prob=0.1,
        )
    )
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=scheduler or DDIMScheduler(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    kwargs = {"class_labels": [1, 3], "num_inference_steps": 3, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


SCHEDULERS = {
    "ddpm_fixed_small": lambda: DDPMScheduler(),
    "ddpm_learned_range": lambda: DDPMScheduler(variance_type="learned_range"),
    "ddim": DDIMScheduler,
    "pndm": lambda: PNDMScheduler(skip_prk_steps=True),
    "dpmsolver++_multistep": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    "dpmsolver++_singlestep": lambda: DPMSolverSinglestepScheduler(algorithm_type="dpmsolver++"),
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "kdpm2": KDPM2DiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "edm_euler": EDMEulerScheduler,
    "edm_dpmsolver": EDMDPMSolverMultistepScheduler,
}


@pytest.mark.parametrize("kind", ["image", "latent"])
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_every_scheduler_samples_finite_images(kind, scheduler_name):
    scheduler = SCHEDULERS[scheduler_name]()
    if kind == "latent":
        pipe = latent_pipeline(scheduler)
    else:  # the image model predicts the variance too when the scheduler wants it
        pipe = image_pipeline(scheduler, learn_sigma=scheduler_name == "ddpm_learned_range")
    images = sample(pipe, guidance_scale=2.0, num_inference_steps=4)
    size = 8 if kind == "image" else 16
    assert images.shape == (2, size, size, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("make", [image_pipeline, latent_pipeline])
def test_fixed_generator_is_deterministic(make):
    pipe = make()
    first, second = sample(pipe, guidance_scale=3.0), sample(pipe, guidance_scale=3.0)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, sample(pipe, seed=1, guidance_scale=3.0))


def test_output_types_and_counts():
    pipe = latent_pipeline()
    out = pipe(class_labels=[0, 4], num_images_per_prompt=2, num_inference_steps=2, output_type="pil")
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    pt = pipe(class_labels=2, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 16, 16)
    latent = pipe(class_labels=2, num_inference_steps=2, output_type="latent").images
    assert latent.shape == (1, 4, 8, 8)
    random_labels = pipe(batch_size=3, num_inference_steps=2, output_type="pt").images
    assert random_labels.shape == (3, 3, 16, 16)
    images, = pipe(class_labels=[1], num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 16, 16, 3)


def test_unconditional_pipeline():
    denoiser = randomise(
        DiffiTTransformer2DModel(
            sample_size=8, in_channels=3, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            num_classes=None, learn_sigma=False,
        )
    )
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="needs a class-conditional denoiser with a null class"):
        pipe(batch_size=1, guidance_scale=2.0, num_inference_steps=2)


def test_callback_on_step_end_can_replace_latents():
    pipe = latent_pipeline()
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe(class_labels=[1], num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert seen == [0, 1, 2]
    assert torch.count_nonzero(out.images) == 0
    with pytest.raises(ValueError, match="may only name"):
        pipe(class_labels=[1], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_guidance_weights_power_cosine_and_constant():
    assert guidance_weight(999, 4.4, "constant") == 4.4
    assert guidance_weight(999, 4.4, "power_cosine", 4.0) == pytest.approx(1.0, abs=1e-6)
    assert guidance_weight(0, 4.4, "power_cosine", 4.0) == pytest.approx(4.4)
    expected = 3.4 * 0.5 * (1 - math.cos(math.pi * 0.5**4)) + 1
    assert guidance_weight(500, 4.4, "power_cosine", 4.0) == pytest.approx(expected)
    with pytest.raises(ValueError, match="Unknown guidance schedule 'cosine'"):
        guidance_weight(1, 2.0, "cosine")


def test_apply_guidance_only_touches_the_guided_channels():
    cond, uncond = torch.full((2, 8, 1, 1), 3.0), torch.full((2, 8, 1, 1), 1.0)
    guided = apply_guidance(cond, uncond, 2.0, 3)
    assert torch.equal(guided[:, :3], torch.full((2, 3, 1, 1), 5.0))
    assert torch.equal(guided[:, 3:], cond[:, 3:])
    assert torch.equal(apply_guidance(cond, uncond, 2.0, None), torch.full((2, 8, 1, 1), 5.0))


class RecordingDenoiser(torch.nn.Module):
    """Stub denoiser: outputs the label as a constant map, so guidance arithmetic is visible in the output."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_classes": 10, "sample_size": 2, "in_channels": 4})()
        self.num_classes = 10
        self.null_class_id = 10
        self.parameterization = DenoiserParameterization(learn_sigma=True)
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.calls = []

    def forward(self, x, timestep, class_labels, return_dict=True):
        self.calls.append((x.shape[0], timestep.clone(), class_labels.clone()))
        value = (class_labels == self.null_class_id).float().view(-1, 1, 1, 1)  # cond -> 0, null -> 1
        output = value.expand(-1, 8, 2, 2).clone()
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def test_pipeline_guides_three_channels_and_passes_learned_variance():
    stub = RecordingDenoiser()
    captured = []

    class CapturingDDPM(DDPMScheduler):
        def step(self, model_output, timestep, sample, **kwargs):
            captured.append((int(timestep), model_output.clone()))
            return super().step(model_output, timestep, sample, **kwargs)

    pipe = DiffiTPipeline.__new__(DiffiTPipeline)
    DiffusionPipeline.__init__(pipe)
    pipe.register_modules(denoiser=stub, scheduler=CapturingDDPM(variance_type="learned_range"), vae=None, guider=None)
    pipe.register_to_config(
        id2label=None, default_num_inference_steps=4, default_guidance_scale=4.4,
        default_guidance_schedule="power_cosine", default_guidance_power=4.0, default_guided_channels=3,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[2], output_type="latent")
    assert [n for n, _, _ in stub.calls] == [2] * 4
    assert stub.calls[0][2].tolist() == [2, 10]
    for timestep, output in captured:
        weight = guidance_weight(timestep, 4.4, "power_cosine", 4.0)
        # uncond (1) + w * (cond (0) - uncond (1)) on channels 0-2; channels 3-7 keep the conditional 0.
        torch.testing.assert_close(output[:, :3], torch.full((1, 3, 2, 2), 1.0 - weight))
        assert output.shape[1] == 8 and torch.count_nonzero(output[:, 3:]) == 0


@pytest.mark.parametrize("make", [image_pipeline, latent_pipeline])
def test_save_load_round_trip_identical_images(make, tmp_path):
    pipe = make(id2label={0: "zero", 1: "one, uno", 2: "two", 3: "three", 4: "four"}, default_guidance_scale=2.5)
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffit", "DiffiTPipeline"]
    assert index["id2label"]["1"] == "one, uno" and index["default_guidance_scale"] == 2.5

    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(loaded), expected)
    assert loaded.get_label_ids(["uno", "three"]) == [1, 3]
    assert loaded.config.default_guidance_scale == 2.5

    generic = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(generic) is DiffiTPipeline
    generic.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(generic), expected)


def test_load_from_hub_repo_id(tmp_path, hub_server):
    pipe = latent_pipeline(id2label={i: str(i) for i in range(5)})
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    push_folder_to_hub(tmp_path / "pipe", "tester/tiny-diffit")
    cache = tmp_path / "cache"

    loaded = DiffiTPipeline.from_pretrained("tester/tiny-diffit", cache_dir=cache)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(loaded), expected)

    generic = DiffusionPipeline.from_pretrained("tester/tiny-diffit", cache_dir=cache, trust_remote_code=True)
    generic.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(generic), expected)


def test_missing_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved pipeline folder"):
        DiffiTPipeline.from_pretrained(tmp_path / "empty")


def test_user_errors_raise_clear_messages():
    pipe = latent_pipeline(id2label={0: "cat", 1: "dog", 2: "golden retriever", 3: "bird", 4: "fish"})
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        pipe(class_labels=[5], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        pipe(class_labels=[-1], num_inference_steps=1)
    with pytest.raises(ValueError, match="Unknown class name 'golden retreiver'.*'golden retriever'"):
        pipe(class_labels=["golden retreiver"], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 8, 8\)"):
        pipe(class_labels=[1], latents=torch.randn(1, 4, 16, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="Unsupported `output_type` 'jpeg'"):
        pipe(class_labels=[1], output_type="jpeg", num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1], guidance_scale=0.5, num_inference_steps=1)
    with pytest.raises(ValueError, match="Unknown guidance schedule"):
        pipe(class_labels=[1], guidance_scale=2.0, guidance_schedule="linear", num_inference_steps=1)
    no_null = DiffiTPipeline(
        denoiser=randomise(
            DiffiTTransformer2DModel(
                sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=8, num_classes=5,
                class_dropout_prob=0.0,
            )
        ),
        scheduler=DDIMScheduler(),
    )
    with pytest.raises(ValueError, match="null class"):
        no_null(class_labels=[1], guidance_scale=2.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs a denoiser that also predicts the variance"):
        image_pipeline(DDPMScheduler(variance_type="learned_range"))(class_labels=[1], num_inference_steps=1)
    with pytest.raises(ValueError, match="cannot drive object"):
        DiffiTPipeline(denoiser=pipe.denoiser, scheduler=object())
    bare = latent_pipeline()
    with pytest.raises(ValueError, match="no `id2label`"):
        bare.get_label_ids("cat")


def test_push_to_hub_uploads_a_loadable_folder_with_a_model_card(tmp_path, hub_server):
    pipe = image_pipeline()
    images = pipe(class_labels=[0, 1], num_inference_steps=2).images
    pipe.push_to_hub("tester/pushed", private=True, sample_images=images, datasets=["digits"])
    files = hub_server.files("tester/pushed")
    assert {"model_index.json", "pipeline_diffit.py", "denoiser/diffit_diffusers.py", "README.md", "samples.png"} <= set(files)
    assert hub_server.is_private("tester/pushed")
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and "diffit" in metadata["tags"]
    assert metadata["datasets"] == ["digits"]
    loaded = DiffiTPipeline.from_pretrained("tester/pushed", cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(loaded), sample(pipe))
