"""The fast paths: the one-gather position bias, the time term, activation recomputation, layouts that keep the
transformer blocks free of copies, torch.compile(fullgraph=True) and mixed precision."""

import collections
import contextlib
import copy

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffit_diffusers import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    TimeDependentSelfAttention,
)
from diffit_diffusers.models.attention import time_dependent_qkv, window_partition
from diffit_diffusers.models.linear import OneDNNLinear
from diffit_diffusers.models.resblock import DiffiTResBlock
from diffit_diffusers.models.time_projections import projection_layers
from diffit_diffusers.models.transformer_block import DiffiTTransformerBlock


def attention(window_size=4, dim=16, heads=2, time_dim=8, seed=0):
    torch.manual_seed(seed)
    attn = TimeDependentSelfAttention(dim, time_dim, heads, window_size)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    return attn.eval()


def latent_model(seed=0, **overrides):
    config = dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_classes=10,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = DiffiTTransformer2DModel(**config)
    with torch.no_grad():  # the released init zeroes the output layer; make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def unet_model(seed=0):
    torch.manual_seed(seed)
    model = DiffiTUNet2DModel.from_preset("tiny")
    nn.init.normal_(model.conv_out.weight, std=0.05)
    return model.eval()


def latent_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([3.0, 500.0]), torch.tensor([1, 10])


def unet_inputs():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 1, 16, 16, generator=generator), torch.tensor([10.0, 400.0]), torch.tensor([1, 10])


# --- Relative position bias ----------------------------------------------------------------------------------------


def test_bias_is_gathered_contiguous_per_head():
    attn = attention()
    bias = attn.relative_position_bias()
    assert bias.shape == (2, 16, 16) and bias.is_contiguous()
    table, index = attn.relative_position_bias_table, attn.relative_position_index
    for head in range(2):
        torch.testing.assert_close(bias[head], table[index, head], rtol=0, atol=0)


# --- Time term -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_time_term_gradients_are_exact(fused):
    attn = attention(window_size=2)
    attn.train()
    if fused:
        attn.fuse_projections()
    x = torch.randn(2, 16, 16, requires_grad=True)
    t = torch.randn(2, 8, requires_grad=True)
    layout = attn.window_layout(x, t, 4, 4)
    query, key, value = time_dependent_qkv(attn, window_partition(x, layout), t, layout)
    (query.sum() + 2 * key.sum() + 3 * value.sum()).backward()
    # d/dx of sum_j c_j (x W_j^T + b_j + t U_j^T + u_j) = sum_j c_j * (column sums of W_j), same for t with U_j.
    spatial = sum(c * getattr(attn, f"to_{n}").weight.sum(0) for c, n in zip((1, 2, 3), "qkv"))
    temporal = sum(c * getattr(attn, f"time_to_{n}").weight.sum(0) for c, n in zip((1, 2, 3), "qkv"))
    torch.testing.assert_close(x.grad, spatial.expand(2, 16, 16))
    # Each image's time token reaches all 16 of its tokens.
    torch.testing.assert_close(t.grad, 16 * temporal.expand(2, 8))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_time_term_is_the_same_with_and_without_gradients(fused):
    attn = attention(window_size=2)
    if fused:
        attn.fuse_projections()
    x, t = torch.randn(2, 16, 16), torch.randn(2, 8)
    layout = attn.window_layout(x, t, 4, 4)
    windows = window_partition(x, layout)
    with torch.no_grad():  # the time term is added in place here
        expected = time_dependent_qkv(attn, windows, t, layout)
    for recorded, reference in zip(time_dependent_qkv(attn, windows, t, layout), expected):
        torch.testing.assert_close(recorded, reference, rtol=0, atol=0)


# --- Eq. 3-5 in one autograd node ------------------------------------------------------------------------------------


def tmsa_layers(model):
    return [module for module in model.modules() if isinstance(module, TimeDependentSelfAttention)]


def hook_every_projection(model) -> list:
    """A no-op forward hook on every TMSA projection, which sends Eq. 3-5 through autograd layer by layer (as for
    any hooked, LoRA or quantized layer); returns the list the hooks append to."""
    calls = []
    for attn in tmsa_layers(model):
        for layer in projection_layers(attn):
            layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


def autograd_node_names(tensor: torch.Tensor) -> list[str]:
    names, seen, pending = [], set(), [tensor.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def assert_close_training_results(results, expected, rtol=1e-4) -> None:
    """Outputs bitwise equal; gradients equal up to float32 rounding (sums taken in another order), measured against
    the model's largest gradient where a parameter's own are rounding noise (the key's time term, which cancels in
    the softmax)."""
    (output, grads), (expected_output, expected_grads) = results, expected
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys()
    scale = max(grad.abs().max().item() for grad in expected_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=rtol, atol=rtol * 0.1 * scale, msg=name)


def padded_unet_inputs():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(2, 1, 14, 14, generator=generator), torch.tensor([10.0, 400.0]), torch.tensor([1, 10])


@pytest.mark.parametrize(
    "build, inputs",
    [(latent_model, latent_inputs), (unet_model, unet_inputs), (unet_model, padded_unet_inputs)],
    ids=["latent", "unet", "unet-padded"],
)
def test_projections_in_one_node_match_autograd_layer_by_layer(build, inputs):
    """CPU training computes each TMSA layer's q, k, v in one autograd node, with the outputs and gradients of the
    six projections run through autograd one by one."""
    model = build()
    model.train()
    names = autograd_node_names(model(*inputs()).sample)
    assert names.count("TimeDependentProjectionsBackward") == len(tmsa_layers(model))
    results = training_step_results(model, inputs())

    reference = copy.deepcopy(model)
    calls = hook_every_projection(reference)
    expected = training_step_results(reference, inputs())
    assert len(calls) == 6 * len(tmsa_layers(model))
    assert len(results[1]) == len(list(model.parameters()))
    assert_close_training_results(results, expected)


class CountKernels(TorchDispatchMode):
    """Counts the aten ops that run inside the context, by name."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_projections_in_one_node_run_the_products_on_onednn_where_the_layers_do():
    """Where ``OneDNNLinear`` runs a product as a oneDNN convolution (AMD CPUs with AVX-512; forced here), the
    one-node projections run the same convolutions forward and backward."""
    model = unet_model()
    model.enable_onednn_linears()
    for module in model.modules():
        if isinstance(module, OneDNNLinear):
            module.min_features = 1
    generator = torch.Generator().manual_seed(5)
    inputs = (torch.randn(16, 1, 16, 16, generator=generator), torch.arange(16) * 60, torch.arange(16) % 11)
    reference = copy.deepcopy(model)
    hook_every_projection(reference)
    kernels = {}
    for name, candidate in (("one node", model), ("layer by layer", reference)):
        with CountKernels() as counter:
            kernels[name] = counter.calls
            training_step_results(candidate, inputs)
    assert kernels["one node"]["convolution"] == kernels["layer by layer"]["convolution"]
    assert kernels["one node"]["convolution_backward"] == kernels["layer by layer"]["convolution_backward"]
    onednn_projections = 3 * len(tmsa_layers(model))  # every to_q, to_k, to_v at 16 images
    assert kernels["one node"]["convolution"] >= onednn_projections
    assert_close_training_results(training_step_results(model, inputs), training_step_results(reference, inputs))


def test_projections_in_one_node_leave_frozen_layers_without_gradients():
    model = latent_model()
    frozen = [tmsa_layers(model)[0].to_q.weight, *(attn.time_to_v.bias for attn in tmsa_layers(model))]
    for parameter in frozen:
        parameter.requires_grad_(False)
    reference = copy.deepcopy(model)
    hook_every_projection(reference)
    results = training_step_results(model, latent_inputs())
    expected = training_step_results(reference, latent_inputs())
    assert len(results[1]) == len(list(model.parameters())) - len(frozen)
    assert_close_training_results(results, expected)


def test_fast_paths_call_layers_with_backward_hooks():
    """A GroupNorm or a projection with a backward hook is called as a module (the one-node projections and the
    GroupNorm recomputed from statistics step aside), so its hook fires in the training backward."""
    model = unet_model_with_learned_norms()
    fired = []
    resblock = next(module for module in model.modules() if isinstance(module, DiffiTResBlock))
    resblock.norm.register_full_backward_hook(lambda *_: fired.append("norm"))
    tmsa_layers(model)[0].to_q.register_full_backward_hook(lambda *_: fired.append("to_q"))
    model.train()
    model(*unet_inputs()).sample.square().mean().backward()
    assert sorted(fired) == ["norm", "to_q"]


@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_projections_in_one_node_are_twice_differentiable(bias):
    """Gradients checked numerically in float64, also of the backward itself (which a gradient penalty
    differentiates)."""
    torch.manual_seed(0)
    attn = TimeDependentSelfAttention(16, 8, 2, 2, bias=bias).double().train()
    x = torch.randn(2, 16, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)

    def projections(x, t):
        layout = attn.window_layout(x, t, 4, 4)
        return time_dependent_qkv(attn, window_partition(x, layout), t, layout)

    assert "TimeDependentProjectionsBackward" in autograd_node_names(projections(x, t)[0])
    assert torch.autograd.gradcheck(projections, (x, t))
    assert torch.autograd.gradgradcheck(projections, (x, t))


# --- Activation recomputation ----------------------------------------------------------------------------------------


def training_step_results(model, inputs, seed=3):
    """Output and every parameter gradient of one forward/backward in train mode (dropout seeded)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    output = model(*inputs).sample
    weights = torch.linspace(-1, 1, output.numel(), device=output.device).view_as(output)
    (output * weights).sum().backward()
    return output.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_identical_training_results(results, expected) -> None:
    """Two ``training_step_results`` agree bitwise: the output and the same parameters' gradients."""
    (output, grads), (expected_output, expected_grads) = results, expected
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0, msg=name)


def dropout_latent_model():
    return latent_model(dropout=0.2)


def unet_model_with_learned_norms():
    """A U-Net whose GroupNorms have a scale and shift away from their initial 1 and 0 (as after training)."""
    model = unet_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1, 0.5)
                module.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize(
    "build, inputs",
    [
        (latent_model, latent_inputs),
        (dropout_latent_model, latent_inputs),
        (unet_model, unet_inputs),
        (unet_model_with_learned_norms, unet_inputs),
    ],
    ids=["latent", "latent-dropout", "unet", "unet-learned-norms"],
)
@pytest.mark.parametrize("saved_tensors", ["kept", "gradient-checkpointing", "save-on-cpu"])
def test_activation_recomputation_gives_identical_outputs_and_gradients(build, inputs, saved_tensors):
    """Also when gradient checkpointing or CPU offloading of saved tensors manage them (recomputation steps aside)."""
    model = build()
    if saved_tensors == "gradient-checkpointing":
        model.enable_gradient_checkpointing()
    context = torch.autograd.graph.save_on_cpu if saved_tensors == "save-on-cpu" else contextlib.nullcontext
    model.disable_activation_recomputation()
    with context():
        expected = training_step_results(model, inputs())
    model.enable_activation_recomputation()
    with context():
        results = training_step_results(model, inputs())
    assert len(results[1]) == len(list(model.parameters()))
    assert_identical_training_results(results, expected)


class TrackTraining(TorchDispatchMode):
    """Records the storage every op creates, and counts convolution and matrix-product kernels."""

    MATRIX_PRODUCTS = {"convolution", "addmm", "mm", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.created: list[tuple[StorageWeakRef, int]] = []
        self.matrix_products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matrix_products += func.overloadpacket.__name__ in self.MATRIX_PRODUCTS
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.created.append((StorageWeakRef(leaf.untyped_storage()), leaf.untyped_storage().nbytes()))
        return out

    def live_bytes(self) -> int:
        alive = {ref.cdata: nbytes for ref, nbytes in self.created if not ref.expired()}
        return sum(alive.values())


def kept_bytes_and_products(model, inputs) -> tuple[int, int]:
    """Bytes the autograd graph holds after a training forward, and matrix products run by forward and backward."""
    model.train()
    with TrackTraining() as tracker:
        loss = model(*inputs).sample.square().mean()
        kept = tracker.live_bytes()
        loss.backward()
    return kept, tracker.matrix_products


@pytest.mark.parametrize("build, inputs", [(latent_model, latent_inputs), (unet_model, unet_inputs)], ids=["latent", "unet"])
def test_activation_recomputation_keeps_less_and_never_reruns_a_matrix_product(build, inputs):
    model = build()
    model.disable_activation_recomputation()
    kept_bytes, kept_products = kept_bytes_and_products(model, inputs())
    model.enable_activation_recomputation()
    recomputed_bytes, recomputed_products = kept_bytes_and_products(model, inputs())
    assert recomputed_products == kept_products
    assert recomputed_bytes < 0.9 * kept_bytes


def test_recomputed_group_norms_reuse_the_forward_statistics():
    """Backward recomputes a ResBlock's GroupNorm from the statistics of its forward, never running the GroupNorm
    kernel again; a GroupNorm with a hook is called again instead, and its gradients stay the same."""
    model = unet_model_with_learned_norms()
    group_norms = [module for module in model.modules() if isinstance(module, nn.GroupNorm)]
    with CountKernels() as forward_only, torch.no_grad():
        model(*unet_inputs())
    with CountKernels() as training:
        model(*unet_inputs()).sample.square().mean().backward()
    assert training.calls["native_group_norm"] == forward_only.calls["native_group_norm"] == len(group_norms)

    model.disable_activation_recomputation()
    expected = training_step_results(model, unet_inputs())
    model.enable_activation_recomputation()
    hooked_calls = []
    hooked = next(module.norm for module in model.modules() if isinstance(module, DiffiTResBlock))
    hooked.register_forward_hook(lambda *_: hooked_calls.append(1))
    with CountKernels() as hooked_training:
        results = training_step_results(model, unet_inputs())
    assert hooked_training.calls["native_group_norm"] == len(group_norms) + 1 and hooked_calls == [1, 1]
    assert_identical_training_results(results, expected)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_activation_recomputation_under_autocast_gives_identical_outputs_and_gradients(device):
    """Mixed-precision training recomputes what autocast computed (on GPUs autocast runs GroupNorm in float32)."""
    model = unet_model_with_learned_norms().to(device)
    inputs = [tensor.to(device) for tensor in unet_inputs()]
    model.disable_activation_recomputation()
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = training_step_results(model, inputs)
    model.enable_activation_recomputation()
    with torch.autocast(device, dtype=torch.bfloat16):
        results = training_step_results(model, inputs)
    assert results[0].dtype == torch.bfloat16
    assert_identical_training_results(results, expected)


@pytest.mark.parametrize(
    "build, inputs, recomputes", [(latent_model, latent_inputs, False), (unet_model, unet_inputs, True)],
    ids=["latent-keeps-activations", "unet-recomputes"],
)
def test_activation_recomputation_default(build, inputs, recomputes):
    """A new U-Net recomputes (it needs that to train in its peer's memory); a new latent model keeps everything."""
    model = build()
    default_bytes, _ = kept_bytes_and_products(model, inputs())
    model.enable_activation_recomputation()
    recomputed_bytes, _ = kept_bytes_and_products(model, inputs())
    model.disable_activation_recomputation()
    kept_bytes, _ = kept_bytes_and_products(model, inputs())
    assert recomputed_bytes < kept_bytes
    assert default_bytes == (recomputed_bytes if recomputes else kept_bytes)


# --- Layouts ---------------------------------------------------------------------------------------------------------


def record_norm1_inputs(model):
    """Collect the tokens every Transformer block's first LayerNorm receives."""
    inputs = []
    for module in model.modules():
        if isinstance(module, DiffiTTransformerBlock):
            module.norm1.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    return inputs


@pytest.mark.parametrize("build, inputs", [(latent_model, latent_inputs), (unet_model, unet_inputs)])
def test_transformer_blocks_receive_contiguous_tokens(build, inputs):
    model = build()
    seen = record_norm1_inputs(model)
    with torch.no_grad():
        output = model(*inputs()).sample
    assert seen and all(tokens.is_contiguous() for tokens in seen), "a LayerNorm would copy its input"
    assert output.is_contiguous()


def test_resblock_output_does_not_depend_on_memory_format():
    torch.manual_seed(0)
    block = DiffiTResBlock(32, 64, time_embed_dim=16, num_attention_heads=2, window_size=4, norm_num_groups=8).eval()
    x, t = torch.randn(2, 32, 8, 12), torch.randn(2, 16)
    with torch.no_grad():
        standard = block(x, t)
        channels_last = block(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(channels_last, standard, atol=1e-5, rtol=1e-5)


def test_unet_with_channels_last_weights_matches():
    model = unet_model()
    inputs = unet_inputs()
    with torch.no_grad():
        expected = model(*inputs).sample
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(*inputs).sample, expected, atol=1e-5, rtol=1e-5)


# --- torch.compile(fullgraph=True) -----------------------------------------------------------------------------------


# "aot_eager" finds graph breaks in seconds; a cold inductor compile on two CPU cores takes about a minute.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_latent_model_compiles_fullgraph(backend):
    model = latent_model()
    x, t, y = latent_inputs()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y).sample, model(x, t, y).sample, atol=1e-4, rtol=1e-4)


def test_latent_model_compiles_fullgraph_for_training():
    model = latent_model().train()
    model.time_embedding.class_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    x, t, y = latent_inputs()

    def gradients(fn):
        model.zero_grad()
        fn(x, t, y).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    compiled = gradients(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for name, grad in gradients(model).items():
        torch.testing.assert_close(compiled[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pipeline_denoising_step_compiles_fullgraph(guidance_scale):
    def pipeline():
        scheduler = DPMSolverMultistepScheduler()
        pipe = DiffiTPipeline(denoiser=latent_model(), scheduler=scheduler, default_guided_channels=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            class_labels=[1, 3], num_inference_steps=2, guidance_scale=guidance_scale, generator=generator,
            output_type="latent",
        ).images

    eager, compiled = pipeline(), pipeline()
    compiled.denoiser = torch.compile(compiled.denoiser, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(sample(compiled), sample(eager), atol=1e-4, rtol=1e-4)


# --- Mixed precision -------------------------------------------------------------------------------------------------


def relative_error(output, reference):
    return ((output.float() - reference).norm() / reference.norm()).item()


# bfloat16 keeps 8 mantissa bits (about 0.4% per rounding), float16 keeps 11.
AUTOCAST_TOLERANCE = {torch.bfloat16: 0.03, torch.float16: 0.005}


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("build, inputs", [(latent_model, latent_inputs), (unet_model, unet_inputs)])
def test_autocast_stays_close_to_float32(build, inputs, dtype, device):
    model = build().to(device)
    args = [tensor.to(device) for tensor in inputs()]
    with torch.no_grad():
        reference = model(*args).sample
        with torch.autocast(device, dtype=dtype):
            output = model(*args).sample
    assert output.dtype == dtype
    assert relative_error(output, reference) < AUTOCAST_TOLERANCE[dtype]
