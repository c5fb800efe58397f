"""diffusers' caches and guiders on DiffiT: every cache x model kind x guidance mode samples, zero-threshold caches
equal uncached sampling, guiders equal DiffiT's rule where they should, and guidance moves samples toward the class
on the exact denoiser of ``test_schedulers_analytic``."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    PerturbedAttentionGuidance,
)
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from test_pipeline import randomise
from test_schedulers_analytic import MEANS, AnalyticDenoiser

from diffit_diffusers import DiffiTGuidance, DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel


STEPS = 6


def transformer():
    return randomise(
        DiffiTTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=3, num_attention_heads=2, attention_head_dim=8,
            num_classes=5, learn_sigma=True,
        )
    )


def unet():
    return randomise(
        DiffiTUNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            window_size=4, attention_head_dim=8, norm_num_groups=8, time_embed_dim=32, num_classes=5,
            class_dropout_prob=0.1, learn_sigma=True,
        )
    )


def pipeline(denoiser, scheduler=None, **kwargs):
    scheduler = scheduler or DDPMScheduler(variance_type="learned_range")
    pipe = DiffiTPipeline(denoiser=denoiser, scheduler=scheduler, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    return pipe(
        class_labels=[1, 3], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
        output_type="latent", **kwargs,
    ).images


def cache_configs(pipe):
    """Every cache that applies to ``pipe.denoiser``, with settings that skip work at these few steps."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    configs = {
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=None),
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=timestep,
        ),
        "faster_cache": FasterCacheConfig(
            spatial_attention_timestep_skip_range=(-1, 1001), unconditional_batch_skip_range=2,
            unconditional_batch_timestep_skip_range=(-1, 1001), current_timestep_callback=timestep,
        ),
    }
    if isinstance(pipe.denoiser, DiffiTTransformer2DModel):
        configs |= {
            "first_block": FirstBlockCacheConfig(threshold=0.5),
            "mag": MagCacheConfig(threshold=0.5, num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS),
            "taylorseer_lite": TaylorSeerCacheConfig(
                cache_interval=2, disable_cache_before_step=2, use_lite_mode=True, taylor_factors_dtype=None
            ),
        }
    return configs


GUIDANCE_MODES = {
    "none": {},
    "diffit_power_cosine": {"guidance_scale": 3.0, "guidance_schedule": "power_cosine"},
    "cfg_interval": {"guider": ClassifierFreeGuidance(guidance_scale=2.0, start=0.3, stop=0.8)},
    "apg": {"guider": AdaptiveProjectedGuidance(guidance_scale=3.0)},
    "cfg_zero_star": {"guider": ClassifierFreeZeroStarGuidance(guidance_scale=2.0)},
}
CACHES = {
    "transformer": ["first_block", "mag", "taylorseer", "taylorseer_lite", "pab", "faster_cache"],
    "unet": ["taylorseer", "pab", "faster_cache"],
}
MODELS = {"transformer": transformer, "unet": unet}


@pytest.mark.parametrize("mode", list(GUIDANCE_MODES))
@pytest.mark.parametrize("kind, cache", [(kind, cache) for kind, caches in CACHES.items() for cache in caches])
def test_every_cache_samples_with_every_guidance_mode(kind, cache, mode):
    pipe = pipeline(MODELS[kind]())
    reference = sample(pipe, **GUIDANCE_MODES[mode])
    pipe.denoiser.enable_cache(cache_configs(pipe)[cache])
    cached = sample(pipe, **GUIDANCE_MODES[mode])
    assert cached.shape == reference.shape and torch.isfinite(cached).all()
    if mode == "diffit_power_cosine":
        assert torch.equal(sample(pipe, **GUIDANCE_MODES[mode]), cached)  # the cache state resets between calls
    pipe.denoiser.disable_cache()
    assert torch.equal(sample(pipe, **GUIDANCE_MODES[mode]), reference)


def exact_configs(pipe):
    """Each cache at the setting that never skips: threshold 0, or recompute at every step."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    configs = {
        "taylorseer": TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0, taylor_factors_dtype=None),
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, current_timestep_callback=timestep
        ),
        "faster_cache": FasterCacheConfig(
            spatial_attention_block_skip_range=1, unconditional_batch_skip_range=1, current_timestep_callback=timestep
        ),
    }
    if isinstance(pipe.denoiser, DiffiTTransformer2DModel):
        configs |= {
            "first_block": FirstBlockCacheConfig(threshold=0.0),
            "mag": MagCacheConfig(threshold=0.0, num_inference_steps=STEPS, mag_ratios=[0.9] * STEPS),
        }
    return configs


EXACT_CACHES = [(kind, cache) for kind, caches in CACHES.items() for cache in caches if cache != "taylorseer_lite"]


@pytest.mark.parametrize("kind, cache", EXACT_CACHES)
def test_cache_that_never_skips_equals_uncached_sampling(kind, cache):
    pipe = pipeline(MODELS[kind]())
    guidance = {"guidance_scale": 3.0, "guidance_schedule": "power_cosine"}
    reference = sample(pipe, **guidance)
    pipe.denoiser.enable_cache(exact_configs(pipe)[cache])
    cached = sample(pipe, **guidance)
    if cache == "faster_cache":  # computes the batch as [uncond; cond] instead of [cond; uncond]
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(cached, reference)


@pytest.mark.parametrize(
    "kind, config, message",
    [
        ("unet", FirstBlockCacheConfig(), "change resolution and width"),
        ("unet", MagCacheConfig(mag_ratios=[1.0] * 4), "change resolution and width"),
        ("unet", TaylorSeerCacheConfig(use_lite_mode=True), "use_lite_mode=False"),
        ("unet", SeaCacheConfig(), "video latents"),
        ("transformer", TextKVCacheConfig(), "text-encoder"),
        ("transformer", FasterCacheConfig(tensor_format="BFCHW"), "tensor_format='BCHW'"),
    ],
)
def test_caches_that_cannot_apply_say_why(kind, config, message):
    with pytest.raises(ValueError, match=message):
        MODELS[kind]().enable_cache(config)


def denoiser_batch_sizes(pipe, **kwargs):
    sizes = []
    handle = pipe.denoiser.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    sample(pipe, **kwargs)
    handle.remove()
    return sizes


def test_guidance_interval_runs_one_batched_forward_only_where_it_guides():
    pipe = pipeline(transformer())
    guider = ClassifierFreeGuidance(guidance_scale=2.0, start=0.34, stop=0.84)  # steps 2, 3, 4 of 6
    assert denoiser_batch_sizes(pipe, guider=guider) == [2, 2, 4, 4, 4, 2]
    assert denoiser_batch_sizes(pipe) == [2] * STEPS
    pipe.denoiser.enable_cache(cache_configs(pipe)["pab"])  # one cache state for all calls: same batch every step
    assert denoiser_batch_sizes(pipe, guider=guider) == [4] * STEPS


@pytest.mark.parametrize("make", [transformer, unet])
def test_diffit_guider_and_diffusers_cfg_equal_the_default_guidance(make):
    pipe = pipeline(make(), scheduler=DDIMScheduler())
    ramp = sample(pipe, guidance_scale=3.0, guidance_schedule="power_cosine", guided_channels=2)
    guider = DiffiTGuidance(guidance_scale=3.0, schedule="power_cosine", guided_channels=2)
    assert torch.equal(sample(pipe, guider=guider), ramp)
    assert torch.equal(sample(pipeline(pipe.denoiser, scheduler=DDIMScheduler(), guider=guider)), ramp)
    constant = sample(pipe, guidance_scale=2.5, guided_channels=None)
    assert torch.equal(sample(pipe, guider=ClassifierFreeGuidance(guidance_scale=2.5)), constant)
    assert not torch.equal(sample(pipe, guider=AdaptiveProjectedGuidance(guidance_scale=2.5)), constant)


def test_guider_round_trips_through_save_and_load(tmp_path):
    pipe = pipeline(unet(), guider=ClassifierFreeGuidance(guidance_scale=2.0, start=0.2))
    expected = sample(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = DiffiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.guider, ClassifierFreeGuidance) and loaded.guider.config.start == 0.2
    assert torch.equal(sample(loaded), expected)


def test_bad_guiders_raise():
    pipe = pipeline(unet())
    with pytest.raises(ValueError, match="either `guider` or the guidance settings"):
        sample(pipe, guider=ClassifierFreeGuidance(), guidance_scale=2.0)
    with pytest.raises(ValueError, match="hooks on the denoiser"):
        sample(pipe, guider=PerturbedAttentionGuidance(perturbed_guidance_layers=[0]))
    with pytest.raises(ValueError, match="must be a diffusers guider"):
        pipeline(unet(), guider="cfg")
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffiTGuidance(guidance_scale=0.5)
    with pytest.raises(ValueError, match="Unknown guidance schedule"):
        DiffiTGuidance(schedule="linear")


# --- Guidance guides: an analytic denoiser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance",
    [
        {"guidance_scale": 3.0},
        {"guidance_scale": 3.0, "guidance_schedule": "power_cosine", "guidance_power": 1.0},
        {"guider": ClassifierFreeGuidance(guidance_scale=3.0, start=0.0, stop=0.7)},
        {"guider": AdaptiveProjectedGuidance(guidance_scale=3.0)},
    ],
    ids=["diffit_constant", "diffit_power_cosine", "cfg_interval", "apg"],
)
def test_guidance_moves_samples_toward_the_requested_class(guidance):
    """On the exact denoiser of a three-Gaussian mixture, guidance pushes each sample away from the other classes:
    further along the direction from the mixture's centre to the requested class's mean."""
    pipe = DiffiTPipeline(denoiser=AnalyticDenoiser(), scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(3).repeat(100)
    directions = MEANS - MEANS.mean(0)
    directions = directions / directions.norm(dim=1, keepdim=True)

    def distance_toward_class(**kwargs):
        images = pipe(
            class_labels=labels, num_inference_steps=20, generator=torch.Generator().manual_seed(0),
            output_type="latent", **kwargs,
        ).images
        return ((images.reshape(len(labels), -1) - MEANS.mean(0)) * directions[labels]).sum(1).mean().item()

    unguided = distance_toward_class()
    assert unguided == pytest.approx((MEANS - MEANS.mean(0)).norm(dim=1).mean().item(), abs=0.05)
    assert distance_toward_class(**guidance) > unguided + 0.1
