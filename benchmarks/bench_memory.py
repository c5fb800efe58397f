"""Weight memory of a DiffiT model in each of diffusers' storage modes (DiffiT-XL/2 by default).

Modes, each loaded with ``from_pretrained`` from one saved float32 copy of the model (random weights: memory does not
depend on their values):

- ``float32``: the checkpoint as saved.
- ``bfloat16``: ``torch_dtype=torch.bfloat16``.
- ``layerwise_bf16`` / ``layerwise_fp8_e4m3``: ``enable_layerwise_casting`` on the bfloat16 load, storing the
  weights of linear and convolution layers in bfloat16 / float8 and computing in bfloat16; the patterns in
  ``_skip_layerwise_casting_patterns`` keep their dtype.
- ``torchao_int8_weight_only``: ``TorchAoConfig(Int8WeightOnlyConfig())``, the rest in bfloat16.
- ``quanto_int8``: ``QuantoConfig(weights_dtype="int8")``, the rest in float32.

Bytes are counted from the tensors themselves (quantized tensors: their integer data plus scales), parameters and
buffers together, so the figure is what the weights occupy, not what a ``get_memory_footprint`` estimate says.

    python benchmarks/bench_memory.py --output benchmarks/results/cpu-memory.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import ModelMixin, QuantoConfig, TorchAoConfig
from harness import machine_info, write_report

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel, load_preset_config


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (a quantized weight) counts the plain tensors it is made of."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner_names)
    return tensor.numel() * tensor.element_size()


def weight_memory(model: torch.nn.Module) -> dict[str, Any]:
    """Total weight bytes and the bytes held in each dtype (float dtypes of plain tensors; ``"quantized"``)."""
    by_dtype: dict[str, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for tensor in tensors:
        plain = type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__")
        key = str(tensor.dtype).removeprefix("torch.") if plain else "quantized"
        by_dtype[key] = by_dtype.get(key, 0) + tensor_bytes(tensor)
    total = sum(by_dtype.values())
    return {"weight_mib": round(total / 2**20, 1), "mib_by_dtype": {k: round(v / 2**20, 1) for k, v in by_dtype.items()}}


def modes(model_cls: type[ModelMixin], folder: str) -> dict[str, Callable[[], ModelMixin]]:
    from torchao.quantization import Int8WeightOnlyConfig

    def layerwise(storage_dtype: torch.dtype) -> ModelMixin:
        model = model_cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
        model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.bfloat16)
        return model

    return {
        "float32": lambda: model_cls.from_pretrained(folder),
        "bfloat16": lambda: model_cls.from_pretrained(folder, torch_dtype=torch.bfloat16),
        "layerwise_bf16": lambda: layerwise(torch.bfloat16),
        "layerwise_fp8_e4m3": lambda: layerwise(torch.float8_e4m3fn),
        "torchao_int8_weight_only": lambda: model_cls.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.bfloat16
        ),
        "quanto_int8": lambda: model_cls.from_pretrained(folder, quantization_config=QuantoConfig(weights_dtype="int8")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="DiffiT-XL/2", help="model preset to measure")
    parser.add_argument("--output", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    config = load_preset_config(args.preset)
    model_cls = {cls.__name__: cls for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel)}[config["_class_name"]]
    report: dict[str, Any] = {"benchmark": "memory", "preset": args.preset, "machine": machine_info(torch.device("cpu"))}
    with tempfile.TemporaryDirectory() as folder:
        model = model_cls.from_config(config)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        results = {}
        for name, load in modes(model_cls, folder).items():
            start = time.perf_counter()
            model = load()
            results[name] = {**weight_memory(model), "load_seconds": round(time.perf_counter() - start, 2)}
            del model
        float32_mib = results["float32"]["weight_mib"]
        for result in results.values():
            result["fraction_of_float32"] = round(result["weight_mib"] / float32_mib, 3)
        report["modes"] = results
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
