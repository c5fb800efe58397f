"""Benchmark TMSA layers: the SDPA (dispatch) path against the explicit and FlexAttention paths, and the time
projection.

Prints one JSON object (and writes it to ``--output`` if given). Every timing is a median over interleaved rounds.

- ``tmsa_forward``: one TMSA layer of a latent preset's width on a global ``grid x grid`` window, through
  ``TimeDependentAttnProcessor`` (diffusers' ``dispatch_attention_fn``, i.e. fused SDPA with the bias as a mask) and
  through ``TimeDependentExplicitAttnProcessor`` (``softmax(QK^T/sqrt(d) + B) V`` written out) and through
  ``TimeDependentFlexAttnProcessor`` (FlexAttention with the bias as ``score_mod``; eager, i.e. PyTorch's unfused
  reference, unless ``--flex_compile`` compiles the layer with inductor).
- ``time_projection``: the per-block time projections ``x_t [W_qt W_kt W_vt]`` of a whole latent model, as the model
  runs them (one small matmul per block) against one matmul with every block's weights concatenated, with the
  concatenation prepared beforehand (the best case for batching) and done per call.
- ``sdpa_kernels``: which attention kernels ``torch.profiler`` sees in inference and training forwards of TMSA layers.
- ``training_attention``: forward + backward of TMSA layers of the shipped models as the default processor trains them
  (on a CPU, ``biased_window_attention``) against SDPA's math kernel.

    python benchmarks/bench_attention.py --output benchmarks/results/cpu-attention.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import profile
from diffusers.models.attention_dispatch import attention_backend
from harness import (
    checked_device,
    interleaved_median_seconds,
    interleaved_samples,
    median_round_ratio,
    report_head,
    write_report,
)

from diffit_diffusers import (
    TimeDependentExplicitAttnProcessor,
    TimeDependentFlexAttnProcessor,
    TimeDependentSelfAttention,
    load_preset_config,
)


#: The SDPA path must beat the explicit path by this factor on this grid side (a global 32x32 window).
SDPA_SPEEDUP_TARGET = (32, 1.5)


def preset_shape(name: str) -> tuple[int, int, int]:
    """(hidden width, heads, blocks) of the DiffiT latent preset ``DiffiT-{name}/2``."""
    config = load_preset_config(f"DiffiT-{name}/2")
    heads = config["num_attention_heads"]
    return heads * config["attention_head_dim"], heads, config["num_layers"]


def bench_tmsa_forward(width_name: str, grid: int, args: argparse.Namespace) -> dict[str, Any]:
    dim, heads, _ = preset_shape(width_name)
    device, dtype = args.device, args.dtype
    torch.manual_seed(0)
    sdpa = TimeDependentSelfAttention(dim, dim, heads, window_size=grid).to(device, dtype).eval()
    explicit = TimeDependentSelfAttention(dim, dim, heads, window_size=grid).to(device, dtype).eval()
    explicit.load_state_dict(sdpa.state_dict())
    explicit.set_processor(TimeDependentExplicitAttnProcessor())
    flex = TimeDependentSelfAttention(dim, dim, heads, window_size=grid).to(device, dtype).eval()
    flex.load_state_dict(sdpa.state_dict())
    flex.set_processor(TimeDependentFlexAttnProcessor())
    flex_layer = torch.compile(flex, fullgraph=True) if args.flex_compile else flex
    x = torch.randn(args.batch_size, grid * grid, dim, device=device, dtype=dtype)
    t = torch.randn(args.batch_size, dim, device=device, dtype=dtype)
    with torch.no_grad():
        reference = sdpa(x, t, grid, grid)
        max_diff = (reference - explicit(x, t, grid, grid)).abs().max().item()
        flex_max_diff = (reference - flex_layer(x, t, grid, grid)).abs().max().item()
        seconds = interleaved_median_seconds(
            {
                "sdpa": lambda: sdpa(x, t, grid, grid),
                "explicit": lambda: explicit(x, t, grid, grid),
                "flex": lambda: flex_layer(x, t, grid, grid),
            },
            args.repeats,
            device,
        )
    return {
        "width": f"DiffiT-{width_name}",
        "dim": dim,
        "heads": heads,
        "grid": grid,
        "sdpa_ms": seconds["sdpa"] * 1e3,
        "explicit_ms": seconds["explicit"] * 1e3,
        "flex_ms": seconds["flex"] * 1e3,
        "flex_mode": "inductor" if args.flex_compile else "eager",
        "sdpa_speedup": seconds["explicit"] / seconds["sdpa"],
        "sdpa_speedup_over_flex": seconds["flex"] / seconds["sdpa"],
        "max_abs_diff": max_diff,
        "flex_max_abs_diff": flex_max_diff,
    }


#: TMSA layers of the shipped models: (name, width, heads, grid side, window side).
MODEL_LAYERS = (
    ("latent S/2 layer, global 16x16 window", 384, 6, 16, 16),
    ("U-Net layer, 4x4 windows on a 16x16 grid", 128, 4, 16, 4),
    ("U-Net layer, 4x4 windows on a padded 14x14 grid", 64, 2, 14, 4),
    ("tiny U-Net layer, 4x4 windows on a 16x16 grid, one head", 32, 1, 16, 4),
)


def sdpa_kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The attention kernels ``torch.profiler`` sees in an inference and a training forward of a TMSA layer."""
    rows = []
    for name, dim, heads, grid, window in MODEL_LAYERS:
        attn = TimeDependentSelfAttention(dim, dim, heads, window, pad_to_window=True).to(args.device, args.dtype)
        x = torch.randn(2, grid * grid, dim, device=args.device, dtype=args.dtype)
        t = torch.randn(2, dim, device=args.device, dtype=args.dtype)
        for mode in ("inference", "training"):
            with profile() as prof:
                if mode == "inference":
                    with torch.no_grad():
                        attn.eval()(x, t, grid, grid)
                else:
                    attn.train()(x, t, grid, grid).sum().backward()
            patterns = ("scaled_dot_product", "softmax", "BiasedWindow")
            kernels = sorted({e.name for e in prof.events() if any(p in e.name for p in patterns)})
            rows.append({"layer": name, "forward": mode, "attention_ops": kernels})
    return rows


def training_attention(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Forward + backward of a TMSA layer as the default processor trains it against SDPA's math kernel (what SDPA
    itself picks on a CPU for a bias that needs a gradient), with the largest gradient difference."""
    rows = []
    for name, dim, heads, grid, window in MODEL_LAYERS:
        torch.manual_seed(0)
        attn = TimeDependentSelfAttention(dim, dim, heads, window, pad_to_window=True).to(args.device, args.dtype)
        x = torch.randn(args.batch_size, grid * grid, dim, device=args.device, dtype=args.dtype, requires_grad=True)
        t = torch.randn(args.batch_size, dim, device=args.device, dtype=args.dtype)
        grad = torch.randn_like(x)

        def default_step():
            attn.zero_grad(set_to_none=True)
            x.grad = None
            attn(x, t, grid, grid).backward(grad)
            return [x.grad, *(p.grad for p in attn.parameters())]

        def math_step():
            with attention_backend("_native_math"):
                return default_step()

        max_grad_diff = max((a - b).abs().max().item() for a, b in zip(default_step(), math_step()))
        samples = interleaved_samples({"default": default_step, "sdpa_math": math_step}, args.repeats, args.device)
        rows.append({
            "layer": name,
            "batch_size": args.batch_size,
            "default_ms": statistics.median(samples["default"]) * 1e3,
            "sdpa_math_ms": statistics.median(samples["sdpa_math"]) * 1e3,
            "speedup": median_round_ratio(samples, "sdpa_math", "default"),
            "max_abs_grad_diff": max_grad_diff,
        })
    return rows


def bench_time_projection(width_name: str, args: argparse.Namespace) -> dict[str, Any]:
    dim, _, num_blocks = preset_shape(width_name)
    device, dtype = args.device, args.dtype
    torch.manual_seed(0)
    projections = [torch.nn.Linear(dim, 3 * dim).to(device, dtype) for _ in range(num_blocks)]
    time_token = torch.randn(args.batch_size, dim, device=device, dtype=dtype)
    weight = torch.cat([p.weight for p in projections]).detach()
    bias = torch.cat([p.bias for p in projections]).detach()

    def concatenated_per_call():
        stacked_weight = torch.cat([p.weight for p in projections])
        stacked_bias = torch.cat([p.bias for p in projections])
        return F.linear(time_token, stacked_weight, stacked_bias).split(3 * dim, dim=1)

    with torch.no_grad():
        seconds = interleaved_median_seconds(
            {
                "per_block": lambda: [p(time_token) for p in projections],
                "one_matmul_prepared": lambda: F.linear(time_token, weight, bias).split(3 * dim, dim=1),
                "one_matmul_concatenated_per_call": concatenated_per_call,
            },
            args.repeats,
            device,
        )
    return {
        "width": f"DiffiT-{width_name}",
        "blocks": num_blocks,
        "matmul_shape_per_block": [args.batch_size, dim, 3 * dim],
        **{f"{name}_ms": value * 1e3 for name, value in seconds.items()},
        "prepared_speedup_over_per_block": seconds["per_block"] / seconds["one_matmul_prepared"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="token grid sides (global windows)")
    parser.add_argument("--widths", nargs="+", default=["S", "B"], choices=["S", "B", "L", "XL"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (default: 7)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--flex_compile", action="store_true", help="compile the flex layer with inductor")
    parser.add_argument("--output", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if min(args.grids) < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--grids, --batch_size and --repeats must be positive integers.")
    args.device, args.dtype = checked_device(parser, args.device), getattr(torch, args.dtype)

    report = report_head(
        "attention", args.device, args.dtype, batch_size=args.batch_size, repeats=args.repeats,
        flex="inductor-compiled layer" if args.flex_compile else "eager (PyTorch's unfused reference)",
        timing="medians over interleaved rounds",
    )
    print("tmsa_forward", file=sys.stderr)
    report["tmsa_forward"] = [bench_tmsa_forward(w, grid, args) for w in args.widths for grid in args.grids]
    print("sdpa_kernels", file=sys.stderr)
    report["sdpa_kernels"] = sdpa_kernels(args)
    print("training_attention", file=sys.stderr)
    report["training_attention"] = training_attention(args)
    print("time_projection", file=sys.stderr)
    report["time_projection"] = [bench_time_projection(w, args) for w in args.widths]
    grid, limit = SDPA_SPEEDUP_TARGET
    report["targets"] = [
        {
            "target": f"{row['width']} TMSA SDPA speed-up over the explicit path on a {grid}x{grid} grid",
            "value": row["sdpa_speedup"],
            "relation": ">=",
            "limit": limit,
            "met": row["sdpa_speedup"] >= limit,
        }
        for row in report["tmsa_forward"]
        if row["grid"] == grid
    ]
    report["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
