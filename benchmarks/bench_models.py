"""Speed of DiffiT models against the diffusers baselines they compete with, in one process.

Comparisons (``--comparisons``):

- ``latent_s2``, ``latent_b2``: DiffiT-S/2 and DiffiT-B/2 against diffusers' ``DiTTransformer2DModel`` with the same
  width, depth, heads and patch size, on 32x32 latents (ImageNet-256 through the SD VAE), 1000 classes.
- ``unet_cifar10_32``: the ``cifar10-32`` DiffiT U-Net against diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 layout,
  plus a profile of where the DiffiT U-Net's forward spends its time.

For every model: parameters; forward FLOPs (``torch.utils.flop_counter``, multiply and add counted as two FLOPs,
attention counted through the math SDPA kernel); median forward latency; sampling throughput of a DPM-Solver run
(latent/pixel space, no VAE decode, no guidance); training-step throughput (forward, MSE loss, backward, AdamW);
peak working memory of a forward and of a training step; and "MFU", the forward's achieved FLOP/s as a fraction of
what a ``torch.mm`` of comparable size achieves in the same process and the same timing rounds. Every timing is a
median over interleaved rounds (see ``harness.py``); the samplers advance in lockstep, one step per model in turn.

    python benchmarks/bench_models.py --output benchmarks/results/cpu-models.json
    python benchmarks/bench_models.py --device cuda --output benchmarks/results/cuda-models.json  # bf16 + compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel
from harness import (
    checked_device,
    interleaved_median_seconds,
    machine_info,
    peak_memory_mib,
    synchronize,
    write_report,
)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel, load_preset_config
from diffit_diffusers.training import build_adamw
from diffit_diffusers.utils import TORCH_DTYPES


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

#: Where the profiled forward spends its time: an op's self time goes to the category of the nearest op, itself
#: first and then its ancestors, whose name contains one of the category's patterns. So the copy a reshape makes
#: (window partition and merge) is told apart from the bias broadcast inside ``addmm`` (a linear layer) and from
#: ``contiguous`` calls (layout changes, e.g. of convolution weights for channels-last inputs).
PROFILE_CATEGORIES = {
    "window partition and merge (reshape copies)": ("aten::reshape",),
    "layout copies (contiguous calls)": ("aten::contiguous",),
    "attention (SDPA kernels)": ("scaled_dot_product", "softmax"),
    "convolutions": ("convolution",),
    "linear layers (projections, MLPs)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "norms (GroupNorm, LayerNorm)": ("group_norm", "layer_norm"),
}
PROFILE_OTHER_CATEGORY = "other (elementwise, activations, concatenation, resampling, embeddings)"

METRIC_NOTES = {
    "forward_ms_median": "median wall time of one no-grad forward of the whole batch",
    "forward_gflops": "FLOPs of one forward (multiply and add = 2 FLOPs), counted in float32 eager mode",
    "mfu": "forward GFLOP/s divided by the GFLOP/s of `mm_reference` timed in the same rounds",
    "sampling_images_per_s": "batch / wall time of a full DPM-Solver run (no VAE decode, no guidance)",
    "training_images_per_s": "batch / median time of forward + MSE loss + backward + AdamW step",
    "peak_memory_forward_mib": "peak memory a no-grad forward allocates on top of weights and inputs",
    "peak_memory_training_mib": "peak memory a training step allocates on top of weights, inputs and AdamW state",
}


@dataclass
class ModelCase:
    """One contestant: a model, its forward keyword arguments and how its output is read."""

    model: nn.Module
    inputs: dict[str, Any]
    sample_argument: str  # forward argument holding the noisy sample
    prediction_channels: int  # leading output channels that predict the noise


@dataclass
class ComparisonSetup:
    cases: dict[str, ModelCase]
    reference: str
    mm_shape: tuple[int, int, int]  # (M, K, N) of the reference matrix product
    profile: str | None = None  # case whose forward is profiled


def latent_comparison(width: str, device: torch.device, batch_size: int) -> ComparisonSetup:
    """``DiffiT-{width}/2`` against a DiT with the same width, depth, heads and patch size."""
    config = load_preset_config(f"DiffiT-{width}/2")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    torch.manual_seed(0)
    diffit = DiffiTTransformer2DModel.from_preset(f"DiffiT-{width}/2").to(device).eval()
    dit = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=config["in_channels"],
        out_channels=2 * config["in_channels"],
        num_layers=config["num_layers"],
        sample_size=config["sample_size"],
        patch_size=config["patch_size"],
        num_embeds_ada_norm=config["num_classes"],
    ).to(device).eval()
    size, channels = config["sample_size"], config["in_channels"]
    inputs = {
        "hidden_states": torch.randn(batch_size, channels, size, size, device=device),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
        "class_labels": torch.randint(0, config["num_classes"], (batch_size,), device=device),
    }
    suffix = f"{width.lower()}{config['patch_size']}"
    tokens = (size // config["patch_size"]) ** 2
    width_channels = heads * head_dim
    return ComparisonSetup(
        cases={
            f"diffit_{suffix}": ModelCase(diffit, inputs, "hidden_states", channels),
            f"dit_{suffix}": ModelCase(dit, inputs, "hidden_states", channels),
        },
        reference=f"dit_{suffix}",
        mm_shape=(batch_size * tokens, width_channels, int(config["mlp_ratio"] * width_channels)),
    )


def unet_comparison(device: torch.device, batch_size: int) -> ComparisonSetup:
    """The ``cifar10-32`` DiffiT U-Net against diffusers' ``UNet2DModel`` in the DDPM CIFAR-10 layout, at 32x32."""
    torch.manual_seed(0)
    diffit = DiffiTUNet2DModel.from_preset("cifar10-32").to(device).eval()
    ddpm = UNet2DModel(**DDPM_CIFAR10_UNET_CONFIG).to(device).eval()
    inputs = {
        "sample": torch.randn(batch_size, 3, 32, 32, device=device),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
    }
    config = diffit.config
    stem = config.block_out_channels[0]
    return ComparisonSetup(
        cases={
            "diffit_unet_cifar10_32": ModelCase(diffit, inputs, "sample", 3),
            "ddpm_unet2d_cifar10": ModelCase(ddpm, inputs, "sample", 3),
        },
        reference="ddpm_unet2d_cifar10",
        mm_shape=(batch_size * 32 * 32, stem, int(config.mlp_ratio * stem)),
        profile="diffit_unet_cifar10_32",
    )


COMPARISONS: dict[str, Callable[[torch.device, int], ComparisonSetup]] = {
    "latent_s2": lambda device, batch_size: latent_comparison("S", device, batch_size),
    "latent_b2": lambda device, batch_size: latent_comparison("B", device, batch_size),
    "unet_cifar10_32": unet_comparison,
}


@dataclass
class RunSettings:
    device: torch.device
    dtype: torch.dtype
    compile_backend: str | None
    repeats: int
    training_repeats: int
    sampling_steps: int

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for everything timed, unless running in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def case_batch_size(case: ModelCase) -> int:
    return case.inputs[case.sample_argument].shape[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_forward_flops(model: nn.Module, inputs: dict[str, Any]) -> int:
    """FLOPs of one float32 forward pass on ``inputs``."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def forward_fn(model: Callable, case: ModelCase, settings: RunSettings) -> Callable[[], Any]:
    def forward():
        with torch.no_grad(), settings.autocast():
            return model(**case.inputs)

    return forward


def training_step_fn(model: Callable, case: ModelCase, settings: RunSettings) -> Callable[[], None]:
    """One optimisation step: forward, MSE against a fixed noise target, backward, AdamW as the trainer builds it
    (torch's fused kernel where the device has one)."""
    optimizer = build_adamw(case.model.parameters(), settings.device, lr=1e-4)
    target = torch.randn_like(case.inputs[case.sample_argument])

    def step():
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            prediction = model(**case.inputs).sample[:, : case.prediction_channels]
        F.mse_loss(prediction.float(), target).backward()
        optimizer.step()

    return step


@torch.no_grad()
def lockstep_sampling_seconds(
    models: dict[str, Callable], cases: dict[str, ModelCase], settings: RunSettings
) -> dict[str, float]:
    """Wall time of a full DPM-Solver run per model; the runs advance one step per model in turn."""
    runs = {}
    for name, case in cases.items():
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(settings.sampling_steps, device=settings.device)
        latents = torch.randn_like(case.inputs[case.sample_argument]) * scheduler.init_noise_sigma
        runs[name] = {"scheduler": scheduler, "latents": latents, "seconds": 0.0}
    for step_index in range(settings.sampling_steps):
        for name, case in cases.items():
            run = runs[name]
            scheduler = run["scheduler"]
            t = scheduler.timesteps[step_index]
            synchronize(settings.device)
            start = time.perf_counter()
            model_input = scheduler.scale_model_input(run["latents"], t)
            inputs = {
                **case.inputs,
                case.sample_argument: model_input,
                "timestep": t.expand(model_input.shape[0]),
            }
            with settings.autocast():
                output = models[name](**inputs).sample[:, : case.prediction_channels]
            run["latents"] = scheduler.step(output.to(model_input.dtype), t, run["latents"]).prev_sample
            synchronize(settings.device)
            run["seconds"] += time.perf_counter() - start
    return {name: run["seconds"] for name, run in runs.items()}


def profile_forward(model: nn.Module, case: ModelCase, settings: RunSettings) -> dict[str, Any]:
    """Share of one eager forward's op time per category (see ``PROFILE_CATEGORIES``)."""
    forward = forward_fn(model, case, settings)
    forward()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward()
        synchronize(settings.device)
    return summarize_profile(prof, PROFILE_CATEGORIES, PROFILE_OTHER_CATEGORY, settings.device.type == "cuda")


def summarize_profile(
    prof: profile,
    categories: dict[str, tuple[str, ...]],
    other: str,
    use_device_time: bool = False,
    enclosing: dict[str, tuple[str, ...]] | None = None,
    refine: Callable[[Any, str], str] | None = None,
) -> dict[str, Any]:
    """Op time per category and the most expensive ops of a finished ``torch.profiler`` run.

    ``enclosing`` maps a category to op names that own everything run inside them (e.g. the matrix products and
    copies of SDPA's math kernel are attention, not linear layers or layout copies); see ``profile_category``.
    ``refine(event, category)`` may move an event to another category (e.g. by its input shapes).
    """
    totals = dict.fromkeys([*categories, other], 0.0)
    per_op: dict[str, float] = {}
    for event in prof.events():
        self_us = event.self_device_time_total if use_device_time else event.self_cpu_time_total
        if self_us <= 0:
            continue
        category = profile_category(event, categories, other, enclosing)
        totals[refine(event, category) if refine else category] += self_us
        per_op[event.name] = per_op.get(event.name, 0.0) + self_us
    total = sum(totals.values())
    top_ops = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    return {
        "clock": "device" if use_device_time else "cpu",
        "total_ms": total / 1e3,
        "categories": {name: {"ms": us / 1e3, "share": us / total} for name, us in totals.items()},
        "top_ops": {name: {"ms": us / 1e3, "share": us / total} for name, us in top_ops},
    }


def matching_category(name: str, categories: dict[str, tuple[str, ...]]) -> str | None:
    """The first category with a pattern that occurs in ``name``."""
    return next((category for category, patterns in categories.items() if any(p in name for p in patterns)), None)


def profile_category(
    event, categories: dict[str, tuple[str, ...]], other: str, enclosing: dict[str, tuple[str, ...]] | None = None
) -> str:
    """The category of the outermost op around ``event`` (itself included) with an ``enclosing`` pattern; else the
    first category with a pattern in the name of ``event``, else of its nearest parent that has one."""
    nearest = outermost = None
    while event is not None:
        nearest = nearest or matching_category(event.name, categories)
        outermost = matching_category(event.name, enclosing or {}) or outermost
        event = event.cpu_parent
    return outermost or nearest or other


def run_comparison(setup: ComparisonSetup, settings: RunSettings) -> dict[str, Any]:
    """Measure every case of ``setup`` and express each one relative to the reference case."""
    device, cases = settings.device, setup.cases
    models = {
        name: torch.compile(case.model, backend=settings.compile_backend) if settings.compile_backend else case.model
        for name, case in cases.items()
    }
    m, k, n = setup.mm_shape
    mm_a = torch.randn(m, k, device=device)
    mm_b = torch.randn(k, n, device=device)

    def reference_mm():
        with settings.autocast():
            return torch.mm(mm_a, mm_b)

    rows = {
        name: {
            "class": type(case.model).__name__,
            "parameters": count_parameters(case.model),
            "forward_gflops": count_forward_flops(case.model, case.inputs) / 1e9,
        }
        for name, case in cases.items()
    }
    # Off CUDA, memory is tracked op by op, which needs eager mode; CUDA allocator statistics also see compiled graphs.
    track_timed_models = device.type == "cuda" or settings.compile_backend is None

    print(f"  forward latency ({settings.repeats} interleaved rounds)", file=sys.stderr)
    forward_fns = {name: forward_fn(models[name], case, settings) for name, case in cases.items()}
    seconds = interleaved_median_seconds({**forward_fns, "torch.mm": reference_mm}, settings.repeats, device)
    mm_gflops_per_s = 2 * m * k * n / seconds["torch.mm"] / 1e9
    for name, row in rows.items():
        row["forward_ms_median"] = seconds[name] * 1e3
        row["forward_gflops_per_s"] = row["forward_gflops"] / seconds[name]
        row["mfu"] = row["forward_gflops_per_s"] / mm_gflops_per_s
        forward = forward_fns[name] if track_timed_models else forward_fn(cases[name].model, cases[name], settings)
        row["peak_memory_forward_mib"] = peak_memory_mib(forward, device)

    print(f"  sampling ({settings.sampling_steps} DPM-Solver steps, lockstep)", file=sys.stderr)
    sampling = lockstep_sampling_seconds(models, cases, settings)
    for name, row in rows.items():
        row["sampling_s"] = sampling[name]
        row["sampling_images_per_s"] = case_batch_size(cases[name]) / sampling[name]

    print(f"  training steps ({settings.training_repeats} interleaved rounds)", file=sys.stderr)
    for case in cases.values():
        case.model.train()
    training_fns = {name: training_step_fn(models[name], case, settings) for name, case in cases.items()}
    training = interleaved_median_seconds(training_fns, settings.training_repeats, device)
    for name, row in rows.items():
        row["training_step_ms_median"] = training[name] * 1e3
        row["training_images_per_s"] = case_batch_size(cases[name]) / training[name]
        step = training_fns[name]
        if not track_timed_models:
            step = training_step_fn(cases[name].model, cases[name], settings)
            step()  # create its AdamW state outside the measured step, as for the timed steps
        row["peak_memory_training_mib"] = peak_memory_mib(step, device)
    for case in cases.values():
        case.model.eval()

    compared = (
        "parameters",
        "forward_gflops",
        "forward_ms_median",
        "mfu",
        "sampling_images_per_s",
        "training_images_per_s",
        "peak_memory_forward_mib",
        "peak_memory_training_mib",
    )
    reference = rows[setup.reference]
    first_case = next(iter(cases.values()))
    result = {
        "input_shape": list(first_case.inputs[first_case.sample_argument].shape),
        "reference": setup.reference,
        "mm_reference": {
            "shape_mkn": [m, k, n],
            "ms_median": seconds["torch.mm"] * 1e3,
            "gflops_per_s": mm_gflops_per_s,
        },
        "models": rows,
        f"ratio_to_{setup.reference}": {
            name: {key: row[key] / reference[key] for key in compared}
            for name, row in rows.items()
            if name != setup.reference
        },
    }
    if setup.profile is not None:
        print(f"  profiling {setup.profile}", file=sys.stderr)
        result["profile"] = {setup.profile: profile_forward(cases[setup.profile].model, cases[setup.profile], settings)}
    return result


def evaluate_targets(comparisons: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed targets this project set itself, checked against the measurements that ran."""
    targets = []
    for comparison, model in (("latent_s2", "diffit_s2"), ("latent_b2", "diffit_b2")):
        if comparison not in comparisons:
            continue
        result = comparisons[comparison]
        ratios = result[f"ratio_to_{result['reference']}"][model]
        targets.append(target(f"{model} forward latency / DiT's", ratios["forward_ms_median"], "<=", 1.0))
        targets.append(target(f"{model} parameters / DiT's", ratios["parameters"], "<=", 0.84))
    if "latent_b2" in comparisons:
        mfu = comparisons["latent_b2"]["models"]["diffit_b2"]["mfu"]
        targets.append(target("diffit_b2 forward MFU (share of same-process torch.mm FLOP/s)", mfu, ">=", 0.6))
    return targets


def target(name: str, value: float, relation: str, limit: float) -> dict[str, Any]:
    met = value <= limit if relation == "<=" else value >= limit
    return {"target": name, "value": value, "relation": relation, "limit": limit, "met": met}


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
    parser.add_argument(
        "--dtype",
        choices=["auto", *TORCH_DTYPES],
        default="auto",
        help="autocast dtype for everything timed; auto = bfloat16 on CUDA, float32 elsewhere",
    )
    parser.add_argument(
        "--compile_backend",
        default="auto",
        help="torch.compile backend for the timed models, or 'none'; auto = inductor on CUDA, none elsewhere",
    )
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward (default: 8)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="interleaved forward rounds (default: 7)")
    parser.add_argument(
        "--training_repeats", type=positive_int, default=5, help="interleaved training-step rounds (default: 5)"
    )
    parser.add_argument(
        "--sampling_steps", type=positive_int, default=50, help="DPM-Solver steps per sampling run (default: 50)"
    )
    parser.add_argument(
        "--comparisons",
        nargs="+",
        choices=list(COMPARISONS),
        default=list(COMPARISONS),
        help="which comparisons to run (default: all)",
    )
    parser.add_argument("--output", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    args.device = checked_device(parser, args.device)
    on_cuda = args.device.type == "cuda"
    args.dtype = TORCH_DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if on_cuda else torch.float32)
    if args.compile_backend == "auto":
        args.compile_backend = "inductor" if on_cuda else None
    elif args.compile_backend == "none":
        args.compile_backend = None
    elif args.compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(
            f"--compile_backend {args.compile_backend!r} is not a torch.compile backend; use 'none', 'auto' or one "
            f"of {', '.join(torch.compiler.list_backends(exclude_tags=()))}."
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = RunSettings(
        device=args.device,
        dtype=args.dtype,
        compile_backend=args.compile_backend,
        repeats=args.repeats,
        training_repeats=args.training_repeats,
        sampling_steps=args.sampling_steps,
    )
    report = {
        "benchmark": "models",
        "machine": machine_info(args.device),
        "settings": {
            "device": str(args.device),
            "dtype": str(args.dtype).removeprefix("torch."),
            "compile_backend": args.compile_backend,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "training_repeats": args.training_repeats,
            "sampling_steps": args.sampling_steps,
            "timing": "medians over interleaved rounds; sampling runs in lockstep",
        },
        "metrics": METRIC_NOTES,
        "comparisons": {},
    }
    for name in args.comparisons:
        print(f"{name}:", file=sys.stderr)
        setup = COMPARISONS[name](args.device, args.batch_size)
        report["comparisons"][name] = run_comparison(setup, settings)
        del setup
    report["targets"] = evaluate_targets(report["comparisons"])
    report["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    write_report(report, args.output)
    for name, result in report["comparisons"].items():
        for model, ratios in result[f"ratio_to_{result['reference']}"].items():
            summary = ", ".join(f"{key} x{value:.2f}" for key, value in ratios.items())
            print(f"{name}: {model} / {result['reference']}: {summary}", file=sys.stderr)
    for row in report["targets"]:
        print(f"target {row['target']} {row['relation']} {row['limit']}: {row['value']:.3f} met={row['met']}",
              file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
