"""``OneDNNLinear``: large float32 CPU products as oneDNN 1x1 convolutions, everything else as ``nn.Linear``."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.models import linear as linear_module
from diffit_diffusers.models.linear import OneDNNLinear, use_onednn_linears


pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


class OpNames(TorchDispatchMode):
    """Names of the aten ops that run inside the context."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def layer_pair(in_features=48, out_features=80, bias=True):
    torch.manual_seed(0)
    reference = nn.Linear(in_features, out_features, bias=bias)
    layer = OneDNNLinear(in_features, out_features, bias=bias)
    layer.load_state_dict(reference.state_dict())
    layer.use_onednn = True
    layer.min_features = 1  # the Zen 5 rule, whatever this machine is
    return reference, layer


def forward_and_grads(layer, inputs, grad_output):
    inputs = inputs.clone().requires_grad_()
    output = layer(inputs)
    output.backward(grad_output)
    return [output.detach(), inputs.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16, 128, 48), (4, 8, 64, 48), (2048, 48)])
def test_onednn_product_equals_linear(shape, bias):
    reference, layer = layer_pair(bias=bias)
    inputs = torch.randn(shape)
    assert layer.runs_on_onednn(inputs)
    grad_output = torch.randn(*shape[:-1], 80)
    with OpNames() as ops:
        results = forward_and_grads(layer, inputs, grad_output)
    assert "convolution" in ops.names and "addmm" not in ops.names and "mm" not in ops.names
    for got, expected in zip(results, forward_and_grads(reference, inputs, grad_output)):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    "inputs, why",
    [
        (torch.randn(8, 48), "too few rows"),
        (torch.randn(1000, 2, 48), "rows not a multiple of 64"),
        (torch.randn(2048, 48, dtype=torch.bfloat16), "not float32"),
        (torch.randn(16, 64, 48), "fewer than 4M multiply-adds (1024 x 48 x 80)"),
    ],
)
def test_other_products_run_as_linear(inputs, why):
    reference, layer = layer_pair()
    layer.to(inputs.dtype)
    reference.to(inputs.dtype)
    assert not layer.runs_on_onednn(inputs), why
    with OpNames() as ops:
        output = layer(inputs)
    assert "convolution" not in ops.names
    torch.testing.assert_close(output, reference(inputs), rtol=0, atol=0)


def test_small_products_and_autocast_run_as_linear():
    _, layer = layer_pair(in_features=32, out_features=32)
    assert not layer.runs_on_onednn(torch.randn(2048, 32))  # 2048 x 32 x 32 multiply-adds: MKL is faster
    _, layer = layer_pair()
    inputs = torch.randn(2048, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.runs_on_onednn(inputs)
        assert layer(inputs).dtype == torch.bfloat16


def test_narrow_products_run_as_linear_below_min_features():
    reference, layer = layer_pair(in_features=48, out_features=256)
    layer.min_features = linear_module.ZEN4_MIN_FEATURES
    inputs = torch.randn(2048, 48)
    assert not layer.runs_on_onednn(inputs)  # 48 features on one side: MKL on Zen 4
    assert not layer.may_run_on_onednn  # for any input
    torch.testing.assert_close(layer(inputs), reference(inputs), rtol=0, atol=0)
    _, wide = layer_pair(in_features=128, out_features=256)
    wide.min_features = linear_module.ZEN4_MIN_FEATURES
    assert wide.runs_on_onednn(torch.randn(2048, 128))
    assert wide.may_run_on_onednn


def test_disabled_layer_and_wrong_width_behave_as_linear():
    reference, layer = layer_pair()
    layer.use_onednn = False
    inputs = torch.randn(2048, 48)
    assert not layer.runs_on_onednn(inputs)
    torch.testing.assert_close(layer(inputs), reference(inputs), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        layer(torch.randn(2048, 40))


def test_use_onednn_linears_shares_parameters_and_keeps_the_state_dict():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 8, bias=False)))
    weights = [p for p in block.parameters()]
    keys = list(block.state_dict())
    use_onednn_linears(block)
    assert [type(m) for m in block.modules() if isinstance(m, nn.Linear)] == [OneDNNLinear, OneDNNLinear]
    assert all(a is b for a, b in zip(block.parameters(), weights))
    assert list(block.state_dict()) == keys and block[2][0].bias is None


def test_onednn_only_by_default_on_amd_x86(monkeypatch):
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "aarch64")
    assert linear_module.onednn_min_features() is None


@pytest.mark.parametrize(
    "vendor, family, flags, expected",
    [
        ("AuthenticAMD", 26, "fpu sse2 avx2 avx512f avx512bw", 1),  # Zen 5: every product above the size thresholds
        ("AuthenticAMD", 25, "fpu sse2 avx2 avx512f avx512bw", linear_module.ZEN4_MIN_FEATURES),  # Zen 4
        ("AuthenticAMD", 25, "fpu sse2 avx2 fma", None),  # Zen 3: MKL's AVX2 products are faster
        ("GenuineIntel", 6, "fpu sse2 avx2 avx512f avx512bw", None),  # MKL takes its AVX-512 path
    ],
)
def test_onednn_by_default_only_on_amd_cpus_with_avx512(tmp_path, monkeypatch, vendor, family, flags, expected):
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        pytest.skip("needs a PyTorch built with MKL and oneDNN")
    monkeypatch.setattr(linear_module.platform, "machine", lambda: "x86_64")
    processor = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n\n"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(processor + processor.replace(": 0", ": 1"))
    assert linear_module.onednn_min_features(str(cpuinfo)) == expected
    assert linear_module.onednn_min_features(str(tmp_path / "missing")) is None


def unet_case():
    torch.manual_seed(0)
    model = DiffiTUNet2DModel.from_preset("tiny")
    inputs = dict(sample=torch.randn(16, 1, 16, 16), timestep=torch.randint(0, 1000, (16,)),
                  class_labels=torch.randint(0, 10, (16,)))
    return model, inputs


def latent_case():
    torch.manual_seed(0)
    model = DiffiTTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=32,
        num_classes=10, learn_sigma=True,
    )
    inputs = dict(hidden_states=torch.randn(16, 4, 16, 16), timestep=torch.randint(0, 1000, (16,)),
                  class_labels=torch.randint(0, 10, (16,)))
    return model, inputs


@pytest.mark.parametrize("case", [unet_case, latent_case])
def test_models_train_the_same_with_and_without_onednn(case):
    model, inputs = case()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)  # every weight matters, including the zero-initialised output
    model.enable_onednn_linears()
    for layer in model.modules():
        if isinstance(layer, OneDNNLinear):
            layer.min_features = 1  # the Zen 5 rule: the narrow layers of these small models run on oneDNN too
    reference = copy.deepcopy(model)
    reference.disable_onednn_linears()
    layers = [m for m in model.modules() if isinstance(m, OneDNNLinear)]
    assert layers and all(m.use_onednn for m in layers)
    assert not any(m.use_onednn for m in reference.modules() if isinstance(m, OneDNNLinear))

    results = []
    for net in (model, reference):
        net.eval()  # no label dropout: both see the same conditioning
        with OpNames() as ops:
            output = net(**inputs).sample
            output.square().mean().backward()
        results.append((output.detach(), {n: p.grad for n, p in net.named_parameters()}, ops.names))
    (output, grads, ops), (expected_output, expected_grads, reference_ops) = results
    assert "convolution" in ops and "addmm" in reference_ops
    torch.testing.assert_close(output, expected_output, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in expected_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5 * scale, msg=name)
