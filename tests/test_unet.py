"""The image-space DiffiTUNet2DModel: windows, skips, presets, schedulers, round trips, compile and errors."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
)
from torch import nn

from diffit_diffusers.models.attention import TimeDependentExplicitAttnProcessor
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from diffit_diffusers.models.resblock import DiffiTResBlock
from diffit_diffusers.models.unet_diffit import DiffiTUNet2DModel, SkipMerge
from diffit_diffusers.presets import available_presets
from model_checks import assert_checkpointing_keeps_gradients


# Parameter counts quoted in the README and docs.
PRESET_PARAMETERS = {"cifar10-32": 30_712_887, "ffhq-64": 41_690_519, "tiny": 628_028}


def small_unet(seed=0, **overrides):
    """A 3-stage U-Net (32/64/64 channels) small enough for many CPU forwards, with a random output head."""
    config = dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
        window_size=4, attention_head_dim=16, mlp_ratio=2.0, norm_num_groups=8, time_embed_dim=32,
        mid_block_layers=1,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = DiffiTUNet2DModel(**config)
    # The output convolution starts at zero; randomise it so the output depends on every other weight.
    nn.init.normal_(model.conv_out.weight, std=0.05)
    return model.eval()


def tiny_preset(seed=0):
    torch.manual_seed(seed)
    model = DiffiTUNet2DModel.from_preset("tiny")
    nn.init.normal_(model.conv_out.weight, std=0.05)
    return model.eval()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def public_config(config):
    """Config entries without the private ``_`` keys, with tuples as lists (the JSON round trip makes lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def attention_by_hand(attn, tokens, time_token, height, width):
    """TMSA computed one window at a time with plain tensor ops; edge windows keep only their real tokens."""
    w, heads = attn.window_size, attn.heads
    batch, _, channels = tokens.shape
    head_dim = channels // heads
    grid = tokens.view(batch, height, width, channels)
    out = torch.empty_like(grid)
    time_qkv = torch.cat([getattr(attn, f"time_to_{n}")(time_token) for n in "qkv"], dim=-1)[:, None]
    table = attn.relative_position_bias_table  # ((2w-1)^2, heads)
    for top in range(0, height, w):
        for left in range(0, width, w):
            window = grid[:, top : top + w, left : left + w]
            rows, cols = window.shape[1:3]
            coords = [(r, c) for r in range(rows) for c in range(cols)]
            index = torch.tensor(
                [[(r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1) for r2, c2 in coords] for r1, c1 in coords]
            )
            bias = table[index].permute(2, 0, 1)  # (heads, n, n)
            window_tokens = window.reshape(batch, rows * cols, channels)
            qkv = torch.cat([getattr(attn, f"to_{n}")(window_tokens) for n in "qkv"], dim=-1) + time_qkv
            q, k, v = (z.view(batch, rows * cols, heads, head_dim).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
            weights = (q @ k.transpose(-1, -2) / head_dim**0.5 + bias).softmax(dim=-1)
            merged = (weights @ v).transpose(1, 2).reshape(batch, rows * cols, channels)
            out[:, top : top + rows, left : left + cols] = attn.to_out(merged).view(batch, rows, cols, channels)
    return out.view(batch, height * width, channels)


@pytest.mark.parametrize("height, width", [(8, 8), (6, 10)])
def test_window_attention_equals_attention_window_by_window(height, width):
    model = small_unet()
    attn = model.down_blocks[1].resnets[0].transformer.attn
    assert attn.window_size == 4 and attn.pad_to_window
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    tokens, time_token = torch.randn(2, height * width, 64), torch.randn(2, 32)
    with torch.no_grad():
        expected = attention_by_hand(attn, tokens, time_token, height, width)
        torch.testing.assert_close(attn(tokens, time_token, height, width), expected, atol=1e-5, rtol=1e-5)


def test_attention_processors_are_exposed_and_agree():
    model = small_unet(layers_per_block=(1, 2, 1))
    num_blocks = (1 + 2 + 1) + 1 + (2 + 3 + 2)  # encoder, bottleneck, decoder
    assert len(model.attn_processors) == num_blocks
    x = torch.randn(2, 3, 24, 40)  # the 6x10 bottleneck map is padded to whole 4x4 windows
    with torch.no_grad():
        default = model(x, 7).sample
        model.set_attn_processor(TimeDependentExplicitAttnProcessor())
        torch.testing.assert_close(model(x, 7).sample, default, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot take an additive attention mask"):
        model.set_attention_backend("flash")


def test_resblock_is_conv_then_transformer_with_outer_residual():
    torch.manual_seed(0)
    block = DiffiTResBlock(16, 32, time_embed_dim=8, num_attention_heads=2, window_size=4, norm_num_groups=4).eval()
    assert isinstance(block.conv_shortcut, nn.Conv2d) and block.conv_shortcut.kernel_size == (1, 1)
    x, t = torch.randn(2, 16, 8, 12), torch.randn(2, 8)
    with torch.no_grad():
        h = block.conv(nn.functional.silu(block.norm(x)))  # Eq. 9
        tokens = block.transformer(h.flatten(2).transpose(1, 2), t, 8, 12)
        expected = tokens.transpose(1, 2).reshape(2, 32, 8, 12) + block.conv_shortcut(x)  # Eq. 10
        torch.testing.assert_close(block(x, t), expected)
    same_width = DiffiTResBlock(16, 16, time_embed_dim=8, num_attention_heads=2, window_size=4, norm_num_groups=4)
    assert same_width.conv_shortcut is None


def test_layout_follows_config_per_stage():
    model = small_unet(layers_per_block=(1, 2, 3), window_size=(4, 2, 1), mid_block_layers=2)
    assert [len(b.resnets) for b in model.down_blocks] == [1, 2, 3]
    assert [len(b.resnets) for b in model.up_blocks] == [4, 3, 2]
    assert len(model.mid_block.resnets) == 2
    assert [b.resnets[0].transformer.attn.window_size for b in model.down_blocks] == [4, 2, 1]
    assert [b.resnets[0].transformer.attn.window_size for b in model.up_blocks] == [1, 2, 4]
    assert model.mid_block.resnets[0].transformer.attn.window_size == 1
    assert [b.resnets[0].transformer.attn.heads for b in model.down_blocks] == [2, 4, 4]
    assert isinstance(model.down_blocks[0].downsampler, Downsample2D) and model.down_blocks[2].downsampler is None
    assert isinstance(model.up_blocks[0].upsampler, Upsample2D) and model.up_blocks[2].upsampler is None
    assert model(torch.randn(1, 3, 16, 16), 3).sample.shape == (1, 3, 16, 16)


def record_skips(model):
    """Hooks that log every tensor the encoder keeps as a skip, and every skip a decoder ResBlock merges."""
    kept, merged, handles = [], [], []

    def keep(module, args, output):
        kept.append(output)

    def merge(module, args, output):
        merged.append((args[0], args[1], output))

    handles.append(model.conv_in.register_forward_hook(keep))
    for block in model.down_blocks:
        handles += [resnet.register_forward_hook(keep) for resnet in block.resnets]
        if block.downsampler is not None:
            handles.append(block.downsampler.register_forward_hook(keep))
    for block in model.up_blocks:
        handles += [skip_merge.register_forward_hook(merge) for skip_merge in block.skip_merges]
    return kept, merged, handles


def test_skips_reach_the_decoder_at_the_same_scale_in_reverse_order():
    model = small_unet(layers_per_block=(1, 2, 1))
    kept, merged, handles = record_skips(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), 10)
    for handle in handles:
        handle.remove()
    assert len(kept) == len(merged) == 1 + (1 + 1) + (2 + 1) + 1  # stem, then ResBlocks (+ downsample) per stage
    for (decoder_in, skip, out), encoder_out in zip(merged, reversed(kept)):
        assert skip is encoder_out
        assert decoder_in.shape[-2:] == skip.shape[-2:]
        assert torch.equal(out, torch.cat([decoder_in, skip], dim=1))


def test_changing_a_skip_changes_the_decoder_output_at_that_scale():
    model = small_unet()
    x = torch.randn(1, 3, 16, 16)
    up_outputs = []
    capture = [block.register_forward_hook(lambda m, a, out: up_outputs.append(out)) for block in model.up_blocks]
    with torch.no_grad():
        model(x, 10)
        reference = list(up_outputs)
        for stage, block in enumerate(model.up_blocks):
            up_outputs.clear()
            handle = block.skip_merges[-1].register_forward_pre_hook(lambda m, args: (args[0], args[1] + 1.0))
            model(x, 10)
            handle.remove()
            for earlier in range(stage):
                assert torch.equal(up_outputs[earlier], reference[earlier])
            assert not torch.allclose(up_outputs[stage], reference[stage]), f"skip of decoder stage {stage} unused"
    for handle in capture:
        handle.remove()


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("cifar10-32", 32), ("ffhq-64", 64)])
def test_presets_at_native_size(name, size):
    model = DiffiTUNet2DModel.from_preset(name).eval()
    assert model.config.sample_size == size
    assert parameter_count(model) == PRESET_PARAMETERS[name]
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size), torch.tensor([10, 500])).sample
    assert out.shape == (2, 3, size, size)


def test_presets_are_listed_with_the_paper_layouts():
    assert {"cifar10-32", "ffhq-64", "tiny"} <= set(available_presets("DiffiTUNet2DModel"))
    with torch.device("meta"):
        cifar = DiffiTUNet2DModel.from_preset("cifar10-32")
        ffhq = DiffiTUNet2DModel.from_preset("ffhq-64")
    assert [len(b.resnets) for b in cifar.down_blocks] == [2, 2, 2]
    assert [b.resnets[0].conv.out_channels for b in cifar.down_blocks] == [128, 256, 256]
    assert cifar.down_blocks[0].resnets[0].transformer.attn.window_size == 4
    assert [len(b.resnets) for b in ffhq.down_blocks] == [1, 2, 2, 2]
    assert [b.resnets[0].conv.out_channels for b in ffhq.down_blocks] == [128, 256, 256, 256]
    assert ffhq.up_blocks[0].resnets[0].transformer.attn.window_size == 8
    assert cifar.time_embedding.timestep_embedder.linear_2.out_features == 512
    tiny = tiny_preset()
    assert parameter_count(tiny) == PRESET_PARAMETERS["tiny"]
    assert (tiny.config.num_classes, tiny.null_class_id) == (10, 10)


def test_zero_initialised_output_head():
    torch.manual_seed(0)
    model = DiffiTUNet2DModel.from_preset("tiny")
    out = model(torch.randn(1, 1, 16, 16), 5, torch.tensor([1])).sample
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("height, width", [(24, 40), (4, 12)])
def test_sizes_that_are_not_whole_windows_are_padded_and_cropped(height, width):
    model = small_unet()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = model(x, 10).sample
        assert out.shape == (2, 3, height, width) and torch.isfinite(out).all()
        # Batch items stay independent: the padding mask is per window, not shared across the batch.
        torch.testing.assert_close(model(x[1:], 10).sample, out[1:], atol=1e-5, rtol=1e-5)


def test_deterministic_outputs_and_construction():
    model, twin = tiny_preset(seed=3), tiny_preset(seed=3)
    x, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 10])
    with torch.no_grad():
        first = model(x, torch.tensor([1, 50, 900]), labels).sample
        assert torch.equal(model(x, torch.tensor([1, 50, 900]), labels).sample, first)
        assert torch.equal(twin(x, torch.tensor([1, 50, 900]), labels).sample, first)


def test_time_and_class_condition_the_output():
    model = tiny_preset()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        reference = model(x, 10, torch.tensor([1, 2])).sample
        assert not torch.allclose(model(x, 700, torch.tensor([1, 2])).sample, reference)
        null = torch.full((2,), model.null_class_id)
        assert not torch.allclose(model(x, 10, null).sample, reference)
        for timestep in (10, 10.0, torch.tensor(10), torch.tensor([10, 10])):
            torch.testing.assert_close(model(x, timestep, torch.tensor([1, 2])).sample, reference)
    assert small_unet().null_class_id is None
    assert small_unet(num_classes=5).null_class_id == 5  # label dropout 0.1 by default, as in the latent model
    assert small_unet(num_classes=5, class_dropout_prob=0.0).null_class_id is None


@pytest.mark.parametrize(
    "overrides",
    [
        dict(skip_connection_type="add"),
        dict(shortcut_kernel_size=3),
        dict(downsample_type="avg_pool", upsample_type="nearest"),
        dict(activation_fn="gelu-approximate", norm_elementwise_affine=False),
    ],
)
def test_decision_options(overrides):
    model = small_unet(**overrides)
    assert model(torch.randn(2, 3, 16, 16), 4).sample.shape == (2, 3, 16, 16)
    if overrides.get("skip_connection_type") == "add":
        pairs = [(m, r) for b in model.up_blocks for m, r in zip(b.skip_merges, b.resnets)]
        assert all(merge.out_channels == resnet.conv.in_channels for merge, resnet in pairs)
        merges = [merge for merge, _ in pairs]
        assert any(m.skip_proj is not None for m in merges) and any(m.skip_proj is None for m in merges)
    if overrides.get("shortcut_kernel_size") == 3:
        assert model.down_blocks[1].resnets[0].conv_shortcut.kernel_size == (3, 3)
    if overrides.get("downsample_type") == "avg_pool":
        assert isinstance(model.down_blocks[0].downsampler.conv, torch.nn.AvgPool2d)
        assert model.up_blocks[0].upsampler.conv is None
    if "norm_elementwise_affine" in overrides:
        assert model.down_blocks[0].resnets[0].transformer.norm1.weight is None


def test_skip_merge_add_projects_only_when_widths_differ():
    same, wider = SkipMerge(8, 8, "add"), SkipMerge(8, 4, "add")
    h, skip8, skip4 = torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(same(h, skip8), h + skip8)
    torch.testing.assert_close(wider(h, skip4), h + wider.skip_proj(skip4))


def test_save_load_round_trip(tmp_path):
    model = small_unet(num_classes=4, class_dropout_prob=0.1, layers_per_block=(1, 2, 1), window_size=(4, 4, 2))
    model.save_pretrained(tmp_path)
    loaded = DiffiTUNet2DModel.from_pretrained(tmp_path).eval()
    assert public_config(loaded.config) == public_config(model.config)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 300]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


@pytest.mark.parametrize(
    "scheduler_cls",
    [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, EDMEulerScheduler],
)
def test_one_step_with_each_scheduler(scheduler_cls):
    model = tiny_preset()
    scheduler = scheduler_cls()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 1, 16, 16, generator=generator) * scheduler.init_noise_sigma
    t = scheduler.timesteps[0]
    with torch.no_grad():
        model_output = model(scheduler.scale_model_input(sample, t), t, torch.tensor([3, 10])).sample
    assert model_output.shape == sample.shape
    prev = scheduler.step(model_output, t, sample, generator=generator).prev_sample
    assert prev.shape == sample.shape and torch.isfinite(prev).all() and not torch.equal(prev, sample)


def test_gradient_checkpointing_gives_same_gradients():
    model = small_unet(num_classes=3).train()
    assert_checkpointing_keeps_gradients(model, torch.randn(2, 3, 16, 16), torch.tensor([5, 50]), torch.tensor([1, 2]))
    assert all(b.gradient_checkpointing for b in [*model.down_blocks, model.mid_block, *model.up_blocks])


# `fullgraph=True` fails on any graph break whatever the backend; "aot_eager" checks that in seconds, while a cold
# inductor compile (which also checks the generated kernels) takes about a minute on two CPU cores.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(backend):
    model = tiny_preset()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 400.0]), torch.tensor([1, 10])
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y).sample, model(x, t, y).sample, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 16, 16), r"shape \(batch, 3, height, width\).*received \(3, 16, 16\)"),
        ((1, 4, 16, 16), r"\(in_channels=3\), received \(1, 4, 16, 16\)"),
        ((1, 3, 18, 16), r"multiples of 4 \(2\^\(stages - 1\) for a 3-stage U-Net\), e\.g\. 4, 8, 12.*18x16"),
        ((1, 3, 16, 6), r"multiples of 4.*16x6"),
    ],
)
def test_bad_sample_shapes_raise(shape, message):
    with pytest.raises(ValueError, match=message):
        small_unet()(torch.randn(shape), 1)


def test_bad_labels_and_timesteps_raise():
    model, unconditional = tiny_preset(), small_unet()
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"class-conditional.*use 10 for the null class"):
        model(x, 1)
    with pytest.raises(ValueError, match=r"\[0, 9\], or 10 for the null class"):
        model(x, 1, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(torch.randn(2, 3, 16, 16), 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(block_out_channels=(32, 40)), r"divisible by `attention_head_dim` \(16\).*\[40\]"),
        (dict(norm_num_groups=12), r"`norm_num_groups` \(12\).*\[32, 64, 64\]"),
        (dict(block_out_channels=()), "at least one stage"),
        (dict(layers_per_block=(1, 2)), r"`layers_per_block` must be .* list of 3 positive integers"),
        (dict(window_size=0), r"`window_size` must be a positive integer"),
        (dict(skip_connection_type="sum"), r"`skip_connection_type` must be one of \('concat', 'add'\)"),
        (dict(downsample_type="pixel"), "`downsample_type` must be one of"),
        (dict(upsample_type="bilinear"), "`upsample_type` must be one of"),
        (dict(shortcut_kernel_size=2), "`shortcut_kernel_size` must be 1 or 3"),
        (dict(mid_block_layers=-1), "`mid_block_layers` must be >= 0"),
        (dict(num_classes=0), "`num_classes` must be a positive integer"),
        (dict(class_dropout_prob=1.0), r"`class_dropout_prob` must be in \[0, 1\)"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_unet(**overrides)
