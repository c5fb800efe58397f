"""Training-step speed and memory of DiffiT models against the diffusers peers of equal width and depth.

One training step is forward, MSE loss against a fixed noise target, backward and an AdamW step (float32, eager).
Pairs (``--pairs``):

- ``tiny_16``, ``tiny_28``: the ``tiny`` DiffiT U-Net (0.63M) against a ``UNet2DModel`` of 0.70M (widths 32/64,
  attention at the second stage, 11 class embeddings), class-conditional, on 16x16 and 28x28 grayscale images.
- ``cifar10_32``: the ``cifar10-32`` DiffiT U-Net against ``UNet2DModel`` in the DDPM CIFAR-10 layout (as in
  ``bench_models.py``).
- ``latent_s2``, ``latent_b2``: DiffiT-S/2 and DiffiT-B/2 against diffusers' ``DiTTransformer2DModel`` with the same
  width, depth, heads and patch size, on 32x32 latents, 1000 classes.

For every model: the median step time over interleaved rounds (see ``harness.py``), the peak working memory of one
step (activations, saved tensors, gradients, optimiser temporaries on top of weights, inputs and AdamW state), the
FLOPs of a forward + backward and the rate the step reaches, on CPU the minor page faults and kernel time per step
(memory the allocator gave back to the OS and faults in again; ``machine.allocator_environment`` records the
``MALLOC_*_`` settings or preloaded allocator of the run), and a profile of a step's op time by operator kind
(forward and backward together; the fastest of three profiled steps). Ratios are DiffiT / peer.

DiffiT runs as users get it: on CPUs where oneDNN outruns PyTorch's MKL products its large linear layers are oneDNN
convolutions (``diffit_diffusers.models.linear``). ``--disable_onednn_linears`` runs them as ``nn.Linear``, the kernels
the peers use, for the like-for-like comparison of the architectures.

    python benchmarks/bench_training.py --output benchmarks/results/cpu-training.json
    python benchmarks/bench_training.py --disable_onednn_linears --output benchmarks/results/cpu-training-mkl.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch
from bench_models import (
    ModelCase,
    RunSettings,
    count_parameters,
    latent_comparison,
    summarize_profile,
    training_step_fn,
    unet_comparison,
)
from diffusers import UNet2DModel
from harness import (
    interleaved_samples,
    machine_info,
    median_round_ratio,
    page_faults_per_call,
    peak_memory_mib,
    write_report,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from diffit_diffusers import DiffiTUNet2DModel
from diffit_diffusers.models.linear import ROWS_PER_MAP, OneDNNLinear


#: ``UNet2DModel`` at the ``tiny`` preset's widths, depth and attention resolution (0.70M parameters).
TINY_PEER_UNET_CONFIG = dict(
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=8,
    num_class_embeds=11,
)

#: Operator kinds of the step profile. An op's self time goes to the first kind whose pattern occurs in its name,
#: else in its parents' names (nearest first); backward ops are matched through their autograd node names. Batched
#: products only come from attention here (linear layers run ``addmm``/``mm``), so they count as attention too.
PROFILE_KINDS = {
    "attention (SDPA forward and backward)": (
        "scaled_dot_product",
        "BiasedWindowAttention",
        "softmax",
        "SoftmaxBackward",
        "aten::bmm",
        "BmmBackward",
    ),
    "relative position bias gather and its backward": (
        "aten::index",
        "IndexBackward",
        "IndexSelectBackward",
        "index_put",
    ),
    "padding masks": ("masked_fill", "aten::repeat", "RepeatBackward"),
    "window partition/merge and layout copies": (
        "aten::reshape",
        "aten::contiguous",
        "aten::clone",
        "constant_pad_nd",
        "CloneBackward",
        "ConstantPadNdBackward",
        "UnsafeViewBackward",
        "ViewBackward",
        "ReshapeAliasBackward",
        "TransposeBackward",
        "PermuteBackward",
        "SliceBackward",
        "UnbindBackward",
        "StackBackward",
    ),
    "convolutions": ("convolution", "Convolution"),
    "linear layers": ("addmm", "aten::mm", "aten::linear", "aten::matmul", "AddmmBackward", "MmBackward"),
    "norms": ("group_norm", "layer_norm", "GroupNormBackward", "LayerNormBackward"),
    "activations": ("gelu", "silu", "GeluBackward", "SiluBackward"),
    "optimizer (AdamW)": ("Optimizer.step", "_foreach", "adamw"),
}
PROFILE_OTHER_KIND = "other (elementwise, concatenation, resampling, embeddings, loss)"
#: Everything inside an SDPA call (the math kernel's products, scaling, softmax and copies) or inside TMSA's CPU
#: training attention (``BiasedWindowAttention`` and its backward, ``diffit_diffusers.models.biased_attention``) is
#: attention; everything inside TMSA's one-node projections (``TimeDependentProjections`` and its backward,
#: ``diffit_diffusers.models.time_projections``: products, the time term and its sums) counts as linear layers.
PROFILE_ENCLOSING_KINDS = {
    "attention (SDPA forward and backward)": ("scaled_dot_product", "BiasedWindowAttention"),
    "linear layers": ("TimeDependentProjections",),
}


def tiny_comparison(device: torch.device, batch_size: int, size: int) -> dict[str, ModelCase]:
    torch.manual_seed(0)
    diffit = DiffiTUNet2DModel.from_preset("tiny").to(device)
    peer = UNet2DModel(sample_size=size, **TINY_PEER_UNET_CONFIG).to(device)
    inputs = {
        "sample": torch.randn(batch_size, 1, size, size, device=device),
        "timestep": torch.randint(0, 1000, (batch_size,), device=device),
        "class_labels": torch.randint(0, 10, (batch_size,), device=device),
    }
    return {f"diffit_tiny_{size}": ModelCase(diffit, inputs, "sample", 1), f"unet2d_tiny_{size}": ModelCase(peer, inputs, "sample", 1)}


def pair_cases(name: str, device: torch.device, batch_size: int) -> dict[str, ModelCase]:
    if name.startswith("tiny_"):
        return tiny_comparison(device, batch_size, int(name.removeprefix("tiny_")))
    if name == "cifar10_32":
        return unet_comparison(device, batch_size).cases
    return latent_comparison(name.removeprefix("latent_")[0].upper(), device, batch_size).cases


PAIRS = ("tiny_16", "tiny_28", "cifar10_32", "latent_s2", "latent_b2")
DEFAULT_BATCH_SIZES = {"tiny_16": 32, "tiny_28": 32, "cifar10_32": 8, "latent_s2": 8, "latent_b2": 4}


def onednn_products_as_linear(event, category: str) -> str:
    """``OneDNNLinear``'s products are convolutions over ``1 x ROWS_PER_MAP`` maps, which no convolution layer of
    these models has: they count as linear layers."""
    maps = [list(shape[2:]) for shape in event.input_shapes if len(shape) == 4]
    return "linear layers" if category == "convolutions" and [1, ROWS_PER_MAP] in maps else category


def profile_step(step, onednn_products: bool, profiled_steps: int = 3) -> dict[str, Any]:
    """Share of one training step's op time (forward, backward and optimiser) per operator kind: of the profiled
    steps, the one with the smallest total (a slow spell of a shared machine only adds time, to some ops more than
    to others).

    Input shapes are recorded only where ``onednn_products`` must be told from convolutions by them: recording
    shapes slows some large products several times over (a ``cifar10-32`` MLP's input-gradient product, 18 ms in a
    plain step, took 126 ms), so a profile that records them no longer adds up to the timed step.
    """
    summaries = []
    for _ in range(profiled_steps):
        with profile(record_shapes=onednn_products) as prof:
            step()
        summaries.append(
            summarize_profile(
                prof, PROFILE_KINDS, PROFILE_OTHER_KIND, enclosing=PROFILE_ENCLOSING_KINDS,
                refine=onednn_products_as_linear if onednn_products else None,
            )
        )
    return min(summaries, key=lambda summary: summary["total_ms"])


def uses_onednn_products(model: torch.nn.Module) -> bool:
    return any(isinstance(module, OneDNNLinear) and module.may_run_on_onednn for module in model.modules())


def count_training_flops(case: ModelCase) -> int:
    """FLOPs of one forward + backward: matrix products and convolutions, attention through SDPA's math kernel so
    that its products count for every model alike."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        prediction = case.model(**case.inputs).sample[:, : case.prediction_channels]
        prediction.float().square().mean().backward()
    case.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_pair(
    name: str, batch_size: int, settings: RunSettings, profile_models: bool, onednn_linears: bool
) -> dict[str, Any]:
    cases = pair_cases(name, settings.device, batch_size)
    for case in cases.values():
        case.model.train()
        if not onednn_linears and hasattr(case.model, "disable_onednn_linears"):
            case.model.disable_onednn_linears()
    steps = {model: training_step_fn(case.model, case, settings) for model, case in cases.items()}
    samples = interleaved_samples(steps, settings.training_repeats, settings.device)
    rows = {}
    for model, case in cases.items():
        step_ms = statistics.median(samples[model]) * 1e3
        flops = count_training_flops(case)
        rows[model] = {
            "class": type(case.model).__name__,
            "parameters": count_parameters(case.model),
            "training_step_ms_median": step_ms,
            "peak_memory_training_mib": peak_memory_mib(steps[model], settings.device),
            "per_step": page_faults_per_call(steps[model]) if settings.device.type == "cpu" else None,
            "training_gflop": flops / 1e9,
            "achieved_gflops": flops / 1e6 / step_ms,
        }
        if profile_models:
            rows[model]["profile"] = profile_step(steps[model], uses_onednn_products(case.model))
    diffit, peer = list(rows)
    return {
        "input_shape": list(next(iter(cases.values())).inputs["sample" if name[0] in "tc" else "hidden_states"].shape),
        "models": rows,
        "diffit_over_peer": {
            "training_speed": median_round_ratio(samples, peer, diffit),
            "peak_memory_training": rows[diffit]["peak_memory_training_mib"] / rows[peer]["peak_memory_training_mib"],
            "parameters": rows[diffit]["parameters"] / rows[peer]["parameters"],
            "training_flops": rows[diffit]["training_gflop"] / rows[peer]["training_gflop"],
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--batch_size", type=int, help="images per step for every pair (default: per pair)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved training-step rounds (default: 5)")
    parser.add_argument("--no_profile", action="store_true", help="skip the per-operator profiles")
    parser.add_argument(
        "--disable_onednn_linears",
        action="store_true",
        help="run DiffiT's linear layers as nn.Linear (PyTorch's MKL products, as the peers run theirs) rather than "
        "as oneDNN convolutions where those are faster (diffit_diffusers.models.linear)",
    )
    parser.add_argument("--output", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--repeats and --batch_size must be positive integers.")
    device = torch.device("cpu")
    settings = RunSettings(device, torch.float32, None, repeats=1, training_repeats=args.repeats, sampling_steps=1)
    report: dict[str, Any] = {
        "benchmark": "training",
        "machine": machine_info(device),
        "settings": {
            "device": "cpu",
            "dtype": "float32",
            "repeats": args.repeats,
            "diffit_onednn_linears": not args.disable_onednn_linears and OneDNNLinear.use_onednn,
            "timing": (
                "interleaved rounds of forward + MSE + backward + AdamW (built as the trainer builds it); step "
                "times are medians, speed ratios the median of the per-round ratios"
            ),
        },
        "pairs": {},
    }
    for name in args.pairs:
        batch_size = args.batch_size or DEFAULT_BATCH_SIZES[name]
        print(f"{name} (batch {batch_size})", file=sys.stderr)
        result = run_pair(name, batch_size, settings, not args.no_profile, not args.disable_onednn_linears)
        report["pairs"][name] = {"batch_size": batch_size, **result}
    report["targets"] = [
        target
        for name, result in report["pairs"].items()
        for target in (
            {"target": f"{name}: DiffiT training speed / peer's", "value": result["diffit_over_peer"]["training_speed"],
             "relation": ">=", "limit": 1.0},
            *(
                [{"target": f"{name}: DiffiT training memory / UNet2DModel's",
                  "value": result["diffit_over_peer"]["peak_memory_training"], "relation": "<=", "limit": 1.3}]
                if not name.startswith("latent") else []
            ),
        )
    ]
    for row in report["targets"]:
        row["met"] = row["value"] >= row["limit"] if row["relation"] == ">=" else row["value"] <= row["limit"]
    report["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    write_report(report, args.output)
    for row in report["targets"]:
        print(f"{row['target']} {row['relation']} {row['limit']}: {row['value']:.3f} met={row['met']}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
