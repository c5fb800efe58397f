"""Compile time and steady-state speed of DiffiT models: eager, whole-model ``torch.compile`` and regional
compilation (``compile_repeated_blocks``, which compiles each model's ``_repeated_blocks``: the Transformer blocks).

For each preset (``--presets``; default the latent DiffiT-S/2 on 32x32 latents and the ``cifar10-32`` U-Net), three
copies of one randomly initialised model run a no-grad forward on one fixed batch. The compile time of a mode is the
wall time of its first forward minus the eager forward's median (inductor, its on-disk caches disabled so every
compilation is cold; dynamo is warmed up beforehand on a throwaway function). Steady-state latencies are medians over
interleaved rounds (``harness.py``). Outputs of both compiled modes are checked against eager.

    python benchmarks/bench_compile.py --output benchmarks/results/cpu-compile.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
from harness import interleaved_median_seconds, machine_info, write_report  # noqa: E402

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel, load_preset_config  # noqa: E402


def build(preset: str, batch_size: int) -> tuple[torch.nn.Module, tuple]:
    config = load_preset_config(preset)
    model_cls = {cls.__name__: cls for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel)}[config["_class_name"]]
    torch.manual_seed(0)
    model = model_cls.from_config(config).eval()
    for parameter in model.parameters():  # the released init zeroes the output layer; make every layer count
        torch.nn.init.normal_(parameter, std=0.02)
    generator = torch.Generator().manual_seed(0)
    size, channels = model.config.sample_size, model.config.in_channels
    sample = torch.randn(batch_size, channels, size, size, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = None if model.config.num_classes is None else torch.arange(batch_size) % model.config.num_classes
    return model, (sample, timestep, labels)


def forward(model: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).sample


def measure(preset: str, batch_size: int, repeats: int) -> dict[str, Any]:
    eager, inputs = build(preset, batch_size)
    whole = torch.compile(copy.deepcopy(eager))
    regional = copy.deepcopy(eager)
    regional.compile_repeated_blocks()
    cpu = torch.device("cpu")
    eager_seconds = interleaved_median_seconds({"eager": lambda: forward(eager, inputs)}, repeats=3, device=cpu)["eager"]
    reference = forward(eager, inputs)
    result: dict[str, Any] = {"parameters": sum(p.numel() for p in eager.parameters()), "batch_size": batch_size}
    for name, model in (("repeated_blocks", regional), ("whole_model", whole)):
        start = time.perf_counter()
        output = forward(model, inputs)
        first = time.perf_counter() - start
        result[f"{name}_compile_seconds"] = round(first - eager_seconds, 2)
        result[f"{name}_max_abs_diff_vs_eager"] = float((output - reference).abs().max())
    latencies = interleaved_median_seconds(
        {
            "eager": lambda: forward(eager, inputs),
            "whole_model": lambda: forward(whole, inputs),
            "repeated_blocks": lambda: forward(regional, inputs),
        },
        repeats=repeats,
        device=cpu,
    )
    for name, seconds in latencies.items():
        result[f"{name}_forward_ms"] = round(seconds * 1e3, 2)
    for name in ("whole_model", "repeated_blocks"):
        result[f"{name}_speedup_vs_eager"] = round(latencies["eager"] / latencies[name], 3)
    result["compile_time_ratio_whole_over_repeated"] = round(
        result["whole_model_compile_seconds"] / max(result["repeated_blocks_compile_seconds"], 1e-9), 2
    )
    return result



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["DiffiT-S/2", "cifar10-32"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--output", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    torch.compile(lambda x: x * 2)(torch.ones(2))  # one-time dynamo/inductor start-up, charged to no mode
    report: dict[str, Any] = {
        "benchmark": "compile",
        "backend": "inductor",
        "machine": machine_info(torch.device("cpu")),
        "results": {},
    }
    for preset in args.presets:
        torch._dynamo.reset()
        report["results"][preset] = measure(preset, args.batch_size, args.repeats)
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
