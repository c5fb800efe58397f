"""The denoiser's parameterization contract: folders saved before it sample exactly as they did, the NVIDIA
recipe is untouched, scheduler assignment is checked, and bad call arguments raise clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.loaders.single_file import official_scheduler
from diffit_diffusers.models.denoiser import DENOISER_CLASSES, DenoiserParameterization, denoiser_class
from diffit_diffusers.pipelines.denoiser_wrapper import SUPPORTED_SCHEDULERS
from diffit_diffusers.training import DataConfig, TrainingConfig, build_objective
from diffit_diffusers.training.trainer import build_denoiser


#: Latents that the pipeline produced for the cases below before the parameterization fields existed (commit
#: 5b5497c: seed 0, labels [1, 3], 4 steps, output_type="latent").
LEGACY_OUTPUTS = json.loads((Path(__file__).parent / "data" / "legacy_pipeline_outputs.json").read_text())


#: Weights of the denoisers below as the base commit's random initialisation left them (fused ``to_qkv`` layout,
#: which the models still load), so the pins do not depend on today's parameter order.
LEGACY_MODELS = Path(__file__).parent / "data" / "legacy_models"


def legacy_weights(model, name: str):
    model.load_state_dict(load_file(LEGACY_MODELS / f"{name}.safetensors"))
    return model.eval()


def transformer():
    return legacy_weights(
        DiffiTTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            num_classes=5, class_dropout_prob=0.1, learn_sigma=True,
        ),
        "transformer",
    )


def unet(learn_sigma=False):
    return legacy_weights(
        DiffiTUNet2DModel(
            sample_size=8, in_channels=1, learn_sigma=learn_sigma, block_out_channels=(16, 32), layers_per_block=1,
            window_size=4, attention_head_dim=8, norm_num_groups=8, time_embed_dim=32, num_classes=5,
            class_dropout_prob=0.1,
        ),
        "unet_learn_sigma" if learn_sigma else "unet",
    )


NVIDIA_RECIPE = dict(
    default_guidance_scale=4.4, default_guidance_schedule="power_cosine", default_guidance_power=4.0,
    default_guided_channels=3,
)
LEGACY_CASES = {
    "nvidia_ddpm_learned_range_power_cosine": (transformer, official_scheduler, NVIDIA_RECIPE),
    "edm_dpmsolver_guided": (
        unet,
        lambda: EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
        dict(default_guidance_scale=2.0),
    ),
    "epsilon_dpmsolver_pp": (
        unet,
        lambda: DPMSolverMultistepScheduler.from_config(DDPMScheduler().config, algorithm_type="dpmsolver++"),
        dict(default_guidance_scale=2.0),
    ),
    "learned_sigma_unet_ddpm": (
        lambda: unet(learn_sigma=True), lambda: DDPMScheduler(variance_type="learned_range"),
        # One guided channel: the base commit also mixed the variance channel under the default 3 (since issue 14
        # the variance is never guided).
        dict(default_guidance_scale=2.0, default_guided_channels=1),
    ),
    "v_prediction_euler": (unet, lambda: EulerDiscreteScheduler(prediction_type="v_prediction"), {}),
}


def sample_latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 3], num_inference_steps=4, generator=generator, output_type="latent").images


def strip_parameterization(denoiser_folder: Path) -> None:
    """Rewrite a saved denoiser config as the package wrote it before the parameterization fields."""
    config_file = denoiser_folder / "config.json"
    config = json.loads(config_file.read_text())
    for name in DenoiserParameterization().to_config():
        if name != "learn_sigma" or config["_class_name"] == "DiffiTUNet2DModel":
            config.pop(name)
    if config["_class_name"] == "DiffiTUNet2DModel" and json.loads(config_file.read_text())["learn_sigma"]:
        config["out_channels"] = 2 * config["in_channels"]  # the old way to ask for learned variance
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_folders_saved_before_the_parameterization_fields_sample_exactly_as_before(case, tmp_path):
    make_denoiser, make_scheduler, recipe = LEGACY_CASES[case]
    DiffiTPipeline(denoiser=make_denoiser(), scheduler=make_scheduler(), **recipe).save_pretrained(tmp_path)
    strip_parameterization(tmp_path / "denoiser")

    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    expected = torch.tensor(LEGACY_OUTPUTS[case])
    torch.testing.assert_close(sample_latents(loaded).flatten(), expected, rtol=1e-4, atol=1e-4)  # CPU-kernel rounding
    # The inferred parameterization is now part of the config and is saved with it.
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "denoiser" / "config.json").read_text())
    assert resaved["parameterization"] == ("edm" if case.startswith("edm") else "vp")


def test_nvidia_recipe_with_the_converters_parameterization_is_unchanged():
    denoiser = transformer()
    assert denoiser.parameterization == DenoiserParameterization(learn_sigma=True)  # ADM/DiT's, as converted
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=official_scheduler(), **NVIDIA_RECIPE)
    expected = torch.tensor(LEGACY_OUTPUTS["nvidia_ddpm_learned_range_power_cosine"])
    torch.testing.assert_close(sample_latents(pipe).flatten(), expected, rtol=1e-4, atol=1e-4)  # CPU-kernel rounding


def test_both_models_share_the_parameterization_fields_and_defaults():
    for cls in (DiffiTUNet2DModel, DiffiTTransformer2DModel):
        assert denoiser_class(cls.__name__) is cls
    assert set(DENOISER_CLASSES) == {"DiffiTUNet2DModel", "DiffiTTransformer2DModel"}
    small = dict(num_classes=10)
    unet_model = DiffiTUNet2DModel(block_out_channels=(32,), time_embed_dim=32, **small)
    latent_model = DiffiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=16, **small)
    assert unet_model.parameterization == latent_model.parameterization == DenoiserParameterization()
    assert unet_model.config.class_dropout_prob == latent_model.config.class_dropout_prob == 0.1
    assert unet_model.null_class_id == latent_model.null_class_id == 10
    with pytest.raises(ValueError, match="expected one of DiffiTTransformer2DModel, DiffiTUNet2DModel"):
        denoiser_class("UNet2DModel")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(parameterization="flow"), "`parameterization` must be one of"),
        (dict(prediction_type="noise"), "`prediction_type` must be one of"),
        (dict(beta_schedule="cosine"), "`beta_schedule` must be one of"),
        (dict(beta_start=0.1, beta_end=0.01), "beta_start < beta_end"),
        (dict(sigma_data=0.0), "`sigma_data` must be positive"),
        (dict(parameterization="edm", learn_sigma=True), "needs `parameterization='vp'`"),
    ],
)
def test_bad_parameterization_fields_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffiTUNet2DModel(block_out_channels=(32,), time_embed_dim=32, **fields)


def small_pipeline():
    pipe = DiffiTPipeline(denoiser=unet(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler_cls", [FlowMatchEulerDiscreteScheduler, LCMScheduler])
def test_unsupported_schedulers_are_refused_at_construction_and_assignment(scheduler_cls):
    pipe = small_pipeline()
    supported = ", ".join(SUPPORTED_SCHEDULERS)
    with pytest.raises(ValueError, match=f"cannot drive {scheduler_cls.__name__}.*{supported}"):
        pipe.scheduler = scheduler_cls()
    assert isinstance(pipe.scheduler, DDIMScheduler)
    with pytest.raises(ValueError, match=f"cannot drive {scheduler_cls.__name__}"):
        DiffiTPipeline(denoiser=pipe.denoiser, scheduler=scheduler_cls())
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.config.scheduler[1] == "EulerDiscreteScheduler"


def test_learned_variance_scheduler_on_a_model_without_it_raises_before_sampling():
    pipe = small_pipeline()
    pipe.scheduler = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="needs a denoiser that also predicts the variance"):
        pipe(class_labels=[1], num_inference_steps=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "`num_inference_steps` must be a positive integer, got 0"),
        (dict(num_inference_steps=-3), "`num_inference_steps` must be a positive integer"),
        (dict(num_inference_steps=2.5), "`num_inference_steps` must be a positive integer"),
        (dict(class_labels=1.7), r"got 1.7 \(float\)"),
        (dict(class_labels=[True]), r"got True \(bool\)"),
        (dict(class_labels=[[0, 1]]), r"flat list.*got \[0, 1\] \(list\)"),
        (dict(class_labels=torch.tensor([[0, 1]])), "0-d or 1-d integer tensor"),
        (dict(class_labels=torch.tensor([0.5])), "0-d or 1-d integer tensor"),
        (dict(class_labels=[0, 1], generator=[torch.Generator()]), "list of 1 generators but 2 images"),
        (dict(batch_size=3, generator=[torch.Generator()] * 2), "list of 2 generators but 3 images"),
        (dict(class_labels=[0, 1], batch_size=3), "`batch_size=3` disagrees with the 2 `class_labels`"),
        (dict(batch_size=0), "`batch_size` must be a positive integer"),
        (dict(num_images_per_prompt=0), "`num_images_per_prompt` must be a positive integer"),
    ],
)
def test_bad_call_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_pipeline()(**{"num_inference_steps": 2, **kwargs})


def test_batch_size_may_repeat_the_label_count():
    pipe = small_pipeline()
    images = pipe(class_labels=[0, 1], batch_size=2, num_images_per_prompt=2, num_inference_steps=2, output_type="np")
    assert images.images.shape == (4, 8, 8, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert pipe(class_labels=[0, 1], num_images_per_prompt=2, generator=generators, num_inference_steps=2).images


@pytest.mark.parametrize(
    "objective, expected",
    [
        ("edm", dict(parameterization="edm", sigma_data=0.5, learn_sigma=False)),
        ("epsilon", dict(parameterization="vp", prediction_type="epsilon", learn_sigma=False)),
        ("v_prediction", dict(parameterization="vp", prediction_type="v_prediction", learn_sigma=False)),
        ("sample", dict(parameterization="vp", prediction_type="sample", learn_sigma=False)),
        ("learned_sigma", dict(parameterization="vp", prediction_type="epsilon", learn_sigma=True)),
    ],
)
@pytest.mark.parametrize("model_config", ["digits-8", "DiffiT-S/2"])
def test_the_trainer_writes_its_objectives_parameterization(objective, expected, model_config):
    config = TrainingConfig(data=DataConfig(dataset_name="digits"), model_config=model_config, objective=objective)
    with torch.device("meta"):
        model = build_denoiser(config, num_classes=10, in_channels=4, sample_size=8)
    assert {name: model.config[name] for name in expected} == expected
    assert model.out_channels == (8 if expected["learn_sigma"] else 4)
    scheduler = build_objective(objective).make_scheduler()
    DiffiTPipeline(denoiser=model, scheduler=scheduler)  # the saved scheduler is one the pipeline drives
