"""Training steps of latent DiffiT on its default attention against FlexAttention: the GPU figures of issue 16
(DiffiT-XL/2 at 256 px, 32x32 latents, and at 512 px, 64x64 latents), runnable on a CPU at small sizes.

Modes (``--modes``):

- ``sdpa``: the default processor, eager: SDPA with the relative position bias as a float mask that needs a
  gradient (on a GPU, whichever SDPA kernel takes such a mask; on a CPU, ``biased_window_attention``);
- ``sdpa_compiled``: the same with the Transformer blocks compiled by inductor (``compile_repeated_blocks``);
- ``flex_compiled``: ``set_attention_backend("flex")`` (the bias as a ``score_mod`` reading the table), Transformer
  blocks compiled; FlexAttention is fused only when compiled.

Per preset and mode: the median training step (forward, MSE, backward, AdamW as the trainer builds it) over
interleaved rounds, the first backward's time (compilation included), how far that backward's parameter gradients
(in eval mode, so that no label dropout differs) are from the first mode's, and the peak memory of a step (on a CPU
for eager modes only: it is tracked by a dispatch mode there, under which compiled code does not run). For ``sdpa``
the report also lists the attention kernels ``torch.profiler`` sees in a training step. A mode that fails is reported
with its error; the others still run.

    python benchmarks/bench_flex_training.py --device cuda --dtype bfloat16 \\
        --output benchmarks/results/gpu-flex-training.json
    python benchmarks/bench_flex_training.py --presets DiffiT-S/2 --batch_size 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_models import ModelCase, RunSettings, training_step_fn
from harness import (
    checked_device,
    interleaved_samples,
    median_round_ratio,
    peak_memory_mib,
    report_head,
    synchronize,
    write_report,
)
from torch.profiler import profile

from diffit_diffusers import DiffiTTransformer2DModel, load_preset_config


MODES = ("sdpa", "sdpa_compiled", "flex_compiled")
#: Substrings of the profiler's op names that identify an attention kernel.
ATTENTION_KERNEL_PATTERNS = (
    "scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "flex", "BiasedWindow",
)


def build_model(preset: str, device: torch.device) -> DiffiTTransformer2DModel:
    """``preset`` with every parameter drawn from N(0, 0.02), so the output layer and the bias tables get gradients."""
    torch.manual_seed(0)
    model = DiffiTTransformer2DModel.from_config(load_preset_config(preset))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02)
    return model.to(device).train()


def model_inputs(model: DiffiTTransformer2DModel, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size, channels = model.config.sample_size, model.config.in_channels
    return {
        "hidden_states": torch.randn(batch_size, channels, size, size, generator=generator).to(device),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=generator).to(device),
        "class_labels": torch.randint(0, model.config.num_classes, (batch_size,), generator=generator).to(device),
    }


def prepare_mode(model: DiffiTTransformer2DModel, mode: str) -> DiffiTTransformer2DModel:
    if mode == "flex_compiled":
        model.set_attention_backend("flex")
    if mode.endswith("_compiled"):
        model.compile_repeated_blocks(fullgraph=True)
    return model


def first_gradients(
    case: ModelCase, target: torch.Tensor, settings: RunSettings
) -> tuple[dict[str, torch.Tensor], float]:
    """Parameter gradients of one backward (no optimizer step) and its wall time (compilation included), in eval
    mode so that no label dropout draws differ between modes."""
    model = case.model
    model.eval().zero_grad(set_to_none=True)
    synchronize(settings.device)
    start = time.perf_counter()
    with settings.autocast():
        prediction = model(**case.inputs).sample[:, : case.prediction_channels]
    F.mse_loss(prediction.float(), target).backward()
    synchronize(settings.device)
    seconds = time.perf_counter() - start
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.train().zero_grad(set_to_none=True)
    return grads, seconds


def attention_kernels(step: Callable[[], None]) -> list[str]:
    """The attention ops ``torch.profiler`` records in one call of ``step``."""
    with profile() as prof:
        step()
    return sorted({e.name for e in prof.events() if any(p in e.name for p in ATTENTION_KERNEL_PATTERNS)})


def gradient_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The largest gradient difference, relative to the largest reference gradient of all parameters (some, such as
    key biases, have gradients that are zero up to rounding, so per-parameter ratios say nothing), and the cosine
    between the two gradients as whole vectors."""
    if grads.keys() != reference.keys():
        return {"error": f"gradients of other parameters: {sorted(grads.keys() ^ reference.keys())[:5]}"}
    ours = torch.cat([grads[name].flatten() for name in reference])
    theirs = torch.cat([tensor.flatten() for tensor in reference.values()])
    diff = (ours - theirs).abs().max().item()
    return {
        "max_abs_diff": diff,
        "relative_to_largest_gradient": diff / max(theirs.abs().max().item(), 1e-30),
        "cosine": F.cosine_similarity(ours.double(), theirs.double(), dim=0).item(),
    }


def measure_preset(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    base = build_model(preset, args.device)
    inputs = model_inputs(base, args.batch_size, args.device)
    target = torch.randn(
        args.batch_size, base.config.in_channels, base.config.sample_size, base.config.sample_size,
        generator=torch.Generator().manual_seed(2),
    ).to(args.device)
    result: dict[str, Any] = {
        "latent_size": base.config.sample_size,
        "tokens": base.grid_size**2,
        "batch_size": args.batch_size,
        "modes": {},
    }
    settings = RunSettings(args.device, args.dtype, None, repeats=1, training_repeats=args.repeats, sampling_steps=1)
    steps, reference, reference_mode = {}, None, None
    for mode in args.modes:
        row = result["modes"][mode] = {}
        try:
            case = ModelCase(prepare_mode(copy.deepcopy(base), mode), inputs, "hidden_states", base.config.in_channels)
            grads, row["first_backward_s"] = first_gradients(case, target, settings)
            if reference is None:
                reference, reference_mode = grads, mode
            else:
                row[f"gradients_vs_{reference_mode}"] = gradient_difference(grads, reference)
            steps[mode] = training_step_fn(case.model, case, settings)
            steps[mode]()  # the optimizer's first step allocates its state
            # On a CPU, peak memory is tracked by a dispatch mode, under which compiled code does not run.
            if args.device.type == "cuda" or not mode.endswith("_compiled"):
                row["peak_memory_training_mib"] = peak_memory_mib(steps[mode], args.device)
            if mode == "sdpa":
                row["attention_kernels"] = attention_kernels(steps[mode])
        except Exception as error:  # one failing mode must not cost the device run of the others
            row["error"] = f"{type(error).__name__}: {error}"[:1000]
            steps.pop(mode, None)
        print(f"{preset} {mode}: {row}", file=sys.stderr)
    del base
    if steps:
        samples = interleaved_samples(steps, args.repeats, args.device)
        first = next(iter(steps))
        for mode, values in samples.items():
            result["modes"][mode]["training_step_ms_median"] = statistics.median(values) * 1e3
            result["modes"][mode][f"speed_vs_{first}"] = median_round_ratio(samples, first, mode)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["DiffiT-XL/2", "DiffiT-XL/2-512"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="interleaved training-step rounds (default: 10)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch_size and --repeats must be positive integers.")
    args.device, args.dtype = checked_device(parser, args.device), getattr(torch, args.dtype)
    for preset in args.presets:
        try:
            load_preset_config(preset)  # an unknown preset fails here, before any model is built
        except ValueError as error:
            parser.error(str(error))
    report = report_head(
        "flex_training", args.device, args.dtype, repeats=args.repeats,
        timing="medians over interleaved rounds of forward + MSE + backward + AdamW; speed ratios are the median of "
        "the per-round ratios against the first mode",
    )
    report["presets"] = {preset: measure_preset(preset, args) for preset in args.presets}
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
