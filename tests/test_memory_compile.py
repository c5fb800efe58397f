"""diffusers' memory and speed machinery on both DiffiT models: layerwise casting, group offloading, quantized
loading, float32-kept modules and regional compilation (``compile_repeated_blocks``)."""

import pytest
import torch
from diffusers import TorchAoConfig

from tiny_models import single_stage_unet, tiny_transformer, tiny_unet


MODELS = {
    "unet": (tiny_unet, (1, 16, 16)),
    "transformer": (lambda: tiny_transformer(num_layers=3), (4, 8, 8)),
}


@pytest.fixture(params=list(MODELS))
def case(request):
    build, shape = MODELS[request.param]
    generator = torch.Generator().manual_seed(1)
    args = (torch.randn(2, *shape, generator=generator), torch.tensor([10, 700]), torch.tensor([3, 10]))
    return build, args


def predict(model, sample, timestep, labels):
    with torch.no_grad():
        return model(sample.to(model.dtype), timestep, labels).sample.float()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).abs().max() / reference.abs().max()).item()


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_layerwise_casting_bf16_storage_is_close_to_float32(case):
    build, args = case
    model = build()
    reference = predict(model, *args)
    fp32_bytes = parameter_bytes(model)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert parameter_bytes(model) < 0.6 * fp32_bytes
    kept = [name for name, p in model.named_parameters() if p.dtype == torch.float32]
    assert kept and all(any(key in name for key in ("time_embedding", "relative_position_bias", "norm", "conv_in",
                                                     "conv_out", "pos_embed", "proj_out")) for name in kept)
    # bfloat16 keeps 8 mantissa bits: one rounding of every stored weight, ~0.4% relative each.
    assert relative_error(predict(model, *args), reference) < 2e-2


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_gives_identical_outputs(case, offload_type):
    build, args = case
    model = build()
    reference = predict(model, *args)
    extra = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(torch.device("cpu"), offload_device=torch.device("cpu"), offload_type=offload_type, **extra)
    torch.testing.assert_close(predict(model, *args), reference, atol=0, rtol=0)


def test_from_pretrained_in_bfloat16_is_close_to_float32(case, tmp_path):
    build, args = case
    model = build()
    reference = predict(model, *args)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    # Whole-bfloat16 compute: activations are rounded too, so a looser bound than storage-only casting.
    assert relative_error(predict(loaded, *args), reference) < 5e-2


def int8_configs() -> dict:
    from diffusers import QuantoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return {
        "torchao_int8_weight_only": dict(
            quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.float32
        ),
        "quanto_int8": dict(quantization_config=QuantoConfig(weights_dtype="int8")),
    }


@pytest.mark.parametrize("backend", ["torchao_int8_weight_only", "quanto_int8"])
def test_int8_quantized_load_is_close_to_float32(case, tmp_path, backend):
    build, args = case
    model = build()
    reference = predict(model, *args)
    model.save_pretrained(tmp_path)
    quantized = type(model).from_pretrained(tmp_path, **int8_configs()[backend]).eval()
    assert quantized.is_quantized
    # Per-channel int8 weights: at most half a step of 1/127 of each row's largest weight.
    assert relative_error(predict(quantized, *args), reference) < 2e-2


@pytest.mark.parametrize(
    "build, shape",
    [(single_stage_unet, (1, 8, 8)), (lambda: tiny_transformer(num_layers=3), (4, 8, 8))],
    ids=["unet", "transformer"],
)
def test_compile_repeated_blocks_matches_eager(build, shape):
    model = build()
    args = (torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700]), None)
    if model.config.num_classes is not None:
        args = (*args[:2], torch.tensor([3, 10]))
    reference = predict(model, *args)
    torch._dynamo.reset()
    # ``aot_eager`` traces each block whole (``fullgraph``: no graph breaks) without waiting for C++ compilation;
    # benchmarks/bench_compile.py measures inductor.
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(predict(model, *args), reference, atol=1e-5, rtol=1e-5)
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
