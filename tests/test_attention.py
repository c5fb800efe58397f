"""Time-dependent self-attention: projections, windows, relative position bias, processors and backends."""

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend

from diffit_diffusers import (
    DiffiTTransformer2DModel,
    TimeDependentAttnProcessor,
    TimeDependentExplicitAttnProcessor,
    TimeDependentFlexAttnProcessor,
    TimeDependentSelfAttention,
)
from diffit_diffusers.models.attention import (
    check_backend_takes_bias,
    relative_position_index,
    time_dependent_qkv,
    window_layout,
    window_merge,
    window_partition,
)


def make_attention(window_size=4, dim=16, heads=2, time_dim=8, pad=False, seed=0):
    torch.manual_seed(seed)
    attn = TimeDependentSelfAttention(dim, time_dim, heads, window_size, pad_to_window=pad)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    return attn


def test_relative_position_index_matches_hand_computed_2x2():
    # Tokens of a 2x2 window, row-major: (0,0), (0,1), (1,0), (1,1). Offsets (dh, dw) map to
    # (dh + 1) * 3 + (dw + 1).
    expected = torch.tensor(
        [
            [4, 3, 1, 0],
            [5, 4, 2, 1],
            [7, 6, 4, 3],
            [8, 7, 5, 4],
        ]
    )
    assert torch.equal(relative_position_index(2), expected)


def test_window_partition_round_trip_and_order():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8 * 12, 3)
    layout = window_layout(2, 8, 12, 4, pad=False)
    windows = window_partition(x, layout)
    assert windows.shape == (2 * 6, 16, 3)
    # The second window of the first image holds rows 0-3, columns 4-7.
    grid = x.view(2, 8, 12, 3)
    assert torch.equal(windows[1], grid[0, :4, 4:8].reshape(16, 3))
    assert torch.equal(window_merge(windows, layout), x)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(3, 6 * 10, 5)
    layout = window_layout(3, 6, 10, 4, pad=True)
    assert (layout.padded_height, layout.padded_width) == (8, 12)
    windows = window_partition(x, layout)
    assert windows.shape == (3 * 6, 16, 5)
    assert torch.equal(window_merge(windows, layout), x)


def test_window_merge_takes_head_major_attention_outputs():
    """Attention outputs arrive as ``(B * nW, N, heads, head_dim)`` views of head-major memory; merging them equals
    merging their contiguous copy, padded or not."""
    for height, width in ((8, 12), (6, 10)):
        layout = window_layout(2, height, width, 4, pad=True)
        head_major = torch.randn(2 * layout.windows_per_image, 3, 16, 5)  # (B * nW, heads, N, d)
        windows = head_major.transpose(1, 2)
        expected = window_merge(windows.reshape(*windows.shape[:2], 15), layout)
        assert torch.equal(window_merge(windows, layout), expected)
        assert expected.shape == (2, height * width, 15)


def test_output_shape_and_time_dependence():
    attn = make_attention()
    x = torch.randn(2, 64, 16)
    t1, t2 = torch.randn(2, 8), torch.randn(2, 8)
    out1 = attn(x, t1, 8, 8)
    assert out1.shape == x.shape
    assert not torch.allclose(out1, attn(x, t2, 8, 8)), "the time token must change the attention output"


def test_projection_is_spatial_plus_time_linear_maps():
    attn = make_attention(window_size=2, dim=8, heads=2, time_dim=4)
    x, t = torch.randn(1, 4, 8), torch.randn(1, 4)
    layout = attn.window_layout(x, t, 2, 2)
    projections = time_dependent_qkv(attn, window_partition(x, layout), t, layout)
    for got, spatial, temporal in zip(projections, ("to_q", "to_k", "to_v"), ("time_to_q", "time_to_k", "time_to_v")):
        w_s, b_s = getattr(attn, spatial).weight, getattr(attn, spatial).bias
        w_t, b_t = getattr(attn, temporal).weight, getattr(attn, temporal).bias
        torch.testing.assert_close(got.flatten(2), x @ w_s.T + b_s + (t @ w_t.T + b_t)[:, None])


def test_windowed_attention_equals_attention_per_window_by_hand():
    attn = make_attention(window_size=2, dim=8, heads=2, time_dim=4)
    x, t = torch.randn(2, 16, 8), torch.randn(2, 4)
    out = attn(x, t, 4, 4)
    grid = x.view(2, 4, 4, 8)
    bias = attn.relative_position_bias()
    for b in range(2):
        for r in (0, 2):
            for c in (0, 2):
                tokens = grid[b, r : r + 2, c : c + 2].reshape(1, 4, 8)
                q, k, v = (
                    (getattr(attn, f"to_{n}")(tokens) + getattr(attn, f"time_to_{n}")(t[b : b + 1])[:, None])[0]
                    .view(4, 2, 4)
                    .transpose(0, 1)
                    for n in "qkv"
                )
                weights = (q @ k.transpose(-1, -2) / 2.0 + bias).softmax(-1)
                expected = attn.to_out((weights @ v).transpose(0, 1).reshape(4, 8))
                got = out.view(2, 4, 4, 8)[b, r : r + 2, c : c + 2].reshape(4, 8)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_padded_grid_ignores_padding_tokens():
    attn = make_attention(window_size=4, pad=True)
    x, t = torch.randn(2, 6 * 6, 16), torch.randn(2, 8)
    out = attn(x, t, 6, 6)
    assert out.shape == x.shape and torch.isfinite(out).all()
    explicit = attn.get_processor()
    attn.set_processor(TimeDependentExplicitAttnProcessor())
    torch.testing.assert_close(attn(x, t, 6, 6), out, atol=1e-5, rtol=1e-5)
    attn.set_processor(explicit)
    # The top-left window only holds real tokens and must not see anything of the others.
    x_changed = x.clone().view(2, 6, 6, 16)
    x_changed[:, 4:, 4:] += 10.0
    out_changed = attn(x_changed.view(2, 36, 16), t, 6, 6)
    torch.testing.assert_close(out.view(2, 6, 6, 16)[:, :4, :4], out_changed.view(2, 6, 6, 16)[:, :4, :4])


@pytest.mark.parametrize("pad", [False, True])
def test_explicit_processor_agrees_with_sdpa(pad):
    attn = make_attention(window_size=4, pad=pad)
    size = 6 if pad else 8
    x, t = torch.randn(3, size * size, 16), torch.randn(3, 8)
    sdpa = attn(x, t, size, size)
    attn.set_processor(TimeDependentExplicitAttnProcessor())
    torch.testing.assert_close(attn(x, t, size, size), sdpa, atol=1e-5, rtol=1e-5)


def test_grid_not_a_whole_number_of_windows_raises():
    attn = make_attention(window_size=4)
    with pytest.raises(ValueError, match=r"received a 6x8 grid.*divisible by 4"):
        attn(torch.randn(1, 48, 16), torch.randn(1, 8), 6, 8)


@pytest.mark.parametrize(
    "tokens, time_shape, message",
    [((1, 60, 16), (1, 8), "60 tokens"), ((1, 64, 12), (1, 8), "width 16"), ((1, 64, 16), (1, 5), "time_token")],
)
def test_bad_shapes_raise(tokens, time_shape, message):
    attn = make_attention()
    with pytest.raises(ValueError, match=message):
        attn(torch.randn(*tokens), torch.randn(*time_shape), 8, 8)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        TimeDependentSelfAttention(10, 4, 3, 4)
    with pytest.raises(ValueError, match="window_size"):
        TimeDependentSelfAttention(8, 4, 2, 0)


def tiny_transformer(**kwargs):
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_classes=10,
    )
    config.update(kwargs)
    return DiffiTTransformer2DModel(**config)


def test_model_processor_api_and_backends():
    model = tiny_transformer()
    processors = model.attn_processors
    assert list(processors) == [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    torch.manual_seed(0)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    expected = model(x, 3, labels).sample
    model.set_attn_processor(TimeDependentExplicitAttnProcessor())
    assert all(isinstance(p, TimeDependentExplicitAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(model(x, 3, labels).sample, expected, atol=1e-5, rtol=1e-5)

    model.set_attn_processor(processors)
    model.set_attention_backend("_native_math")
    torch.testing.assert_close(model(x, 3, labels).sample, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'flash' cannot take an additive attention mask.*'native'"):
        model.set_attention_backend("flash")


def test_backend_check_rejects_maskless_backends_at_call_time():
    check_backend_takes_bias("native")
    with pytest.raises(ValueError, match="_native_flash"):
        check_backend_takes_bias("_native_flash")
    attn = make_attention()
    attn.processor._attention_backend = "sage"
    with pytest.raises(ValueError, match="'sage' cannot take"):
        attn(torch.randn(1, 64, 16), torch.randn(1, 8), 8, 8)


# --- QKV fusion (diffusers' AttentionModuleMixin contract) and checkpoints with fused projections -----------------


def tiny_unet(attention_head_dim=8):
    from diffit_diffusers import DiffiTUNet2DModel

    torch.manual_seed(0)
    model = DiffiTUNet2DModel(
        in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1, window_size=4,
        attention_head_dim=attention_head_dim, norm_num_groups=4, time_embed_dim=32, mid_block_layers=1,
    )
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


def fused_state_dict(model):
    """The model's weights as checkpoints saved before the projections were separate hold them."""
    state_dict = dict(model.state_dict())
    for key in [k for k in state_dict if ".to_q." in k or ".time_to_q." in k]:
        stem, name, parameter = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1], key.rsplit(".", 1)[1]
        parts = [state_dict.pop(f"{stem}.{name[:-1]}{n}.{parameter}") for n in "qkv"]
        state_dict[f"{stem}.{name}kv.{parameter}"] = torch.cat(parts)
    return state_dict


@pytest.mark.parametrize("build, inputs", [
    (tiny_transformer, lambda: (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))),
    (tiny_unet, lambda: (torch.randn(2, 1, 12, 12), torch.tensor([3, 700]), None)),  # 12x12 and 6x6 grids: padded
])
def test_fuse_and_unfuse_qkv_projections_keep_outputs(build, inputs):
    model = build().eval()  # no label dropout
    x, t, y = inputs()
    attn = next(m for m in model.modules() if isinstance(m, TimeDependentSelfAttention))
    assert not attn.fused_projections and not hasattr(attn, "to_qkv")
    expected = model(x, t, y).sample
    model.fuse_qkv_projections()
    assert attn.fused_projections and attn.to_qkv.out_features == 3 * attn.dim
    assert attn.time_to_qkv.in_features == attn.time_embed_dim
    torch.testing.assert_close(model(x, t, y).sample, expected, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    assert not attn.fused_projections and not hasattr(attn, "to_qkv") and not hasattr(attn, "time_to_qkv")
    torch.testing.assert_close(model(x, t, y).sample, expected, atol=0, rtol=0)


def test_lora_style_wrapped_projection_is_called():
    """Projections replaced by other modules (as LoRA or quantization do) are called, not bypassed."""
    attn = make_attention()
    x, t = torch.randn(1, 64, 16), torch.randn(1, 8)
    before = attn(x, t, 8, 8)
    attn.to_v = torch.nn.Sequential(attn.to_v, torch.nn.Identity())
    torch.testing.assert_close(attn(x, t, 8, 8), before, atol=1e-6, rtol=1e-6)
    handle = attn.to_k.register_forward_hook(lambda module, args, output: output * 0)
    assert not torch.allclose(attn(x, t, 8, 8), before)
    handle.remove()


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused-model", "fused-model"])
def test_checkpoints_with_fused_projections_load(tmp_path, fuse):
    from safetensors.torch import save_file

    model = tiny_transformer().eval()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    expected = model(x, 3, labels).sample
    model.save_pretrained(tmp_path)
    save_file(fused_state_dict(model), tmp_path / "diffusion_pytorch_model.safetensors")  # an older folder

    loaded = DiffiTTransformer2DModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(x, 3, labels).sample, expected, atol=0, rtol=0)
    plain = tiny_transformer().eval()
    if fuse:
        plain.fuse_qkv_projections()
    plain.load_state_dict(fused_state_dict(model))
    torch.testing.assert_close(plain(x, 3, labels).sample, expected, atol=1e-5, rtol=1e-5)
    if fuse:  # a fused model also loads today's separate weights
        other = tiny_transformer().eval()
        other.fuse_qkv_projections()
        other.load_state_dict(model.state_dict())
        torch.testing.assert_close(other(x, 3, labels).sample, expected, atol=1e-5, rtol=1e-5)


# --- FlexAttention ----------------------------------------------------------------------------------------------


@pytest.fixture
def flex_reference_backward_on_cpu(monkeypatch):
    """PyTorch refuses FlexAttention backward on CPU with an up-front device check, though its unfused reference
    implementation computes it. Lifting that check lets the tests compare gradients through the flex processor's
    ``score_mod`` and ``block_mask`` on this CPU; the processor itself still refuses CPU training."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(TimeDependentFlexAttnProcessor, "_check_device_supports_backward", lambda self, attn, x: None)


def model_and_training_step(build, inputs):
    """A model with weights that give every layer a gradient, its inputs ``(x, t, y)``, and a function that runs one
    MSE step and returns the output and every parameter's gradient."""
    model = build().eval()  # no label dropout
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, y = inputs()
    target = torch.randn_like(x)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(x, t, y).sample
        torch.nn.functional.mse_loss(out[:, : x.shape[1]], target).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    return model, (x, t, y), loss_and_grads


def assert_same_step(actual, expected):
    """Outputs and every parameter gradient (the relative position bias table's included) agree."""
    (out, grads), (expected_out, expected_grads) = actual, expected
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    assert any("relative_position_bias_table" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("build, inputs", [
    (tiny_transformer, lambda: (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))),
    (tiny_unet, lambda: (torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), None)),  # unpadded 16x16 and 8x8
    (tiny_unet, lambda: (torch.randn(2, 1, 12, 12), torch.tensor([3, 700]), None)),  # padded 12x12 and 6x6
], ids=["transformer", "unet", "unet-padded"])
def test_flex_processor_matches_default_forward_and_gradients(build, inputs, flex_reference_backward_on_cpu):
    model, (x, t, y), loss_and_grads = model_and_training_step(build, inputs)
    expected = loss_and_grads()
    model.set_attention_backend("flex")
    assert all(isinstance(p, TimeDependentFlexAttnProcessor) for p in model.attn_processors.values())
    # Only this model's layers: the process-wide default stays (other models' training is unaffected).
    assert tiny_transformer()(torch.randn(1, 4, 8, 8), 3, torch.tensor([1])).sample.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).sample, expected[0], atol=1e-5, rtol=1e-5)
    assert_same_step(loss_and_grads(), expected)
    model.reset_attention_backend()
    assert all(type(p) is TimeDependentAttnProcessor for p in model.attn_processors.values())


def test_flex_processor_compiles_with_inductor_on_cpu():
    # Inductor's CPU flex template needs each of q, k, v as its own 4D buffer, not a transposed view of the
    # projection's output (torch 2.13 failed to lower the latter with "not enough values to unpack").
    model = tiny_transformer().eval()
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, t, labels).sample
        model.set_attention_backend("flex")
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x, t, labels).sample, expected, atol=1e-5, rtol=1e-5)


def test_flex_processor_refuses_cpu_training_with_a_clear_error():
    model = tiny_transformer().eval()
    model.set_attention_backend("flex")
    x, labels = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with torch.no_grad():
        assert model(x, 3, labels).sample.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="no backward on CPU"):
        model(x, 3, labels)
    model.set_attention_backend("native")
    assert model(x, 3, labels).sample.requires_grad


# --- CPU training through the fused kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [3, 4], ids=["fused-kernel", "kept-probabilities"])  # 4 tokens per window
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_biased_window_attention_gradients_pass_gradcheck(padded, head_dim):
    from diffit_diffusers.models.biased_attention import biased_window_attention

    torch.manual_seed(0)
    images, windows, tokens, heads = 2, 3, 4, 2
    q, k, v = (torch.randn(images * windows, tokens, heads, head_dim, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(heads, tokens, tokens, dtype=torch.float64)
    key_padding = None
    if padded:  # the last window of every image has two padded keys
        key_padding = torch.zeros(windows, 1, 1, tokens, dtype=torch.float64)
        key_padding[-1, ..., 2:] = float("-inf")
    inputs = tuple(t.requires_grad_() for t in (q, k, v, bias))

    def attention(q, k, v, bias):
        return biased_window_attention(q, k, v, bias, head_dim**-0.5, key_padding)

    assert torch.autograd.gradcheck(attention, inputs)
    # Against softmax(Q K^T * scale + B + padding) V written out.
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * head_dim**-0.5 + bias
    if padded:
        scores = (scores.unflatten(0, (images, windows)) + key_padding).flatten(0, 1)
    expected = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(attention(*inputs), expected)
    if padded:  # padded keys get no attention and pass no gradient to their values
        attention(*inputs).sum().backward()
        assert v.grad.unflatten(0, (images, windows))[:, -1, 2:].abs().max() == 0


def attention_kernels_in_training(model, inputs) -> set[str]:
    """The SDPA kernels (not the dispatching ``aten::scaled_dot_product_attention``) of a training step."""
    with torch.profiler.profile() as prof:
        model(*inputs).sample.sum().backward()
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


FUSED_KERNEL = {"aten::_scaled_dot_product_flash_attention_for_cpu"}


def wide_head_unet():
    return tiny_unet(attention_head_dim=16)


@pytest.mark.parametrize("build, inputs, kernels", [
    (tiny_transformer, lambda: (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])), FUSED_KERNEL),
    # 16-token windows, 8-wide heads: the fused kernel; 16-wide heads: probabilities kept, no SDPA kernel at all.
    (tiny_unet, lambda: (torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), None), FUSED_KERNEL),
    (tiny_unet, lambda: (torch.randn(2, 1, 12, 12), torch.tensor([3, 700]), None), FUSED_KERNEL),
    (wide_head_unet, lambda: (torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), None), set()),
    (wide_head_unet, lambda: (torch.randn(2, 1, 12, 12), torch.tensor([3, 700]), None), set()),
], ids=["transformer", "unet", "unet-padded", "unet-kept-probabilities", "unet-kept-probabilities-padded"])
def test_cpu_training_matches_the_math_kernels_gradients(build, inputs, kernels):
    model, inputs, loss_and_grads = model_and_training_step(build, inputs)
    assert attention_kernels_in_training(model, inputs) == kernels
    step = loss_and_grads()
    with attention_backend("_native_math"):
        assert attention_kernels_in_training(model, inputs) == {"aten::_scaled_dot_product_attention_math"}
        assert_same_step(step, loss_and_grads())
    # PyTorch's own kernel choice is respected: with the fused kernel switched off, SDPA's math kernel runs.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert attention_kernels_in_training(model, inputs) == {"aten::_scaled_dot_product_attention_math"}
        assert_same_step(step, loss_and_grads())


def test_cpu_training_attention_refuses_a_double_backward_that_the_math_kernel_serves():
    model = tiny_transformer()
    x, labels = torch.randn(1, 4, 8, 8, requires_grad=True), torch.tensor([1])

    def gradient_penalty():
        (grad,) = torch.autograd.grad(model(x, 3, labels).sample.sum(), x, create_graph=True)
        grad.square().sum().backward()

    with pytest.raises(RuntimeError, match=r"differentiated once.*create_graph=True.*_native_math"):
        gradient_penalty()
    with attention_backend("_native_math"):
        gradient_penalty()
    assert model.transformer_blocks[0].attn.relative_position_bias_table.grad is not None
