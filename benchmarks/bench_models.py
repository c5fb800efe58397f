"""Size, FLOPs and forward latency of DiffiT models against the diffusers baselines they compete with.

Each comparison builds its models (random weights) in this process, counts parameters, counts forward FLOPs with
``torch.utils.flop_counter`` (multiply and add count as two FLOPs; attention is counted through the math SDPA
kernel, which the counter sees as matrix products), and times forwards with interleaved repeats, reporting
medians. The result is one JSON object on stdout; a short summary of the ratios goes to stderr.

    python benchmarks/bench_models.py --device cuda --batch_size 8 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffit_diffusers.models.unet_diffit import DiffiTUNet2DModel


#: diffusers' ``UNet2DModel`` with the DDPM CIFAR-10 layout (Ho et al. 2020; 35.7M parameters).
DDPM_CIFAR10_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)

ModelCase = tuple[nn.Module, dict[str, Any]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_forward_flops(model: nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one forward pass on ``inputs``."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def median_forward_seconds(cases: dict[str, ModelCase], device: torch.device, repeats: int) -> dict[str, float]:
    """Median forward time of each model, timing the models in turn within every repeat (after one warm-up)."""
    seconds = {name: [] for name in cases}
    for repeat in range(repeats + 1):
        for name, (model, inputs) in cases.items():
            synchronize(device)
            start = time.perf_counter()
            model(**inputs)
            synchronize(device)
            if repeat > 0:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in seconds.items()}


def compare(
    cases: dict[str, ModelCase], reference: str, device: torch.device, repeats: int
) -> dict[str, Any]:
    """Measure every case and express each one relative to ``reference`` (value / reference value)."""
    latency = median_forward_seconds(cases, device, repeats)
    models = {
        name: {
            "class": type(model).__name__,
            "parameters": count_parameters(model),
            "forward_gflops": count_forward_flops(model, inputs) / 1e9,
            "forward_ms_median": latency[name] * 1e3,
        }
        for name, (model, inputs) in cases.items()
    }
    ratios = {
        name: {key: row[key] / models[reference][key] for key in ("parameters", "forward_gflops", "forward_ms_median")}
        for name, row in models.items()
        if name != reference
    }
    return {"reference": reference, "models": models, f"ratio_to_{reference}": ratios}


def compare_cifar10_unets(device: torch.device, batch_size: int, repeats: int) -> dict[str, Any]:
    """The ``cifar10-32`` DiffiT U-Net against diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 layout, at 32x32."""
    torch.manual_seed(0)
    diffit = DiffiTUNet2DModel.from_preset("cifar10-32").to(device).eval()
    ddpm = UNet2DModel(**DDPM_CIFAR10_UNET_CONFIG).to(device).eval()
    inputs = {
        "sample": torch.randn(batch_size, 3, 32, 32, device=device),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
    }
    result = compare(
        {"diffit_unet_cifar10_32": (diffit, inputs), "ddpm_unet2d_cifar10": (ddpm, inputs)},
        reference="ddpm_unet2d_cifar10",
        device=device,
        repeats=repeats,
    )
    return {"input_shape": list(inputs["sample"].shape), **result}


COMPARISONS: dict[str, Callable[[torch.device, int, int], dict[str, Any]]] = {
    "unet_cifar10_32": compare_cifar10_unets,
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to run on (default: cuda if available, else cpu)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward (default: 8)")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed forwards per model (default: 10)")
    parser.add_argument(
        "--comparisons",
        nargs="+",
        choices=sorted(COMPARISONS),
        default=sorted(COMPARISONS),
        help="which comparisons to run (default: all)",
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but CUDA is not available; use --device cpu.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = {
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else str(args.device),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "comparisons": {
            name: COMPARISONS[name](args.device, args.batch_size, args.repeats) for name in args.comparisons
        },
    }
    print(json.dumps(report, indent=2))
    for name, result in report["comparisons"].items():
        for model, ratios in result[f"ratio_to_{result['reference']}"].items():
            summary = ", ".join(f"{key} x{value:.2f}" for key, value in ratios.items())
            print(f"{name}: {model} / {result['reference']}: {summary}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
