"""Benchmark one TMSA layer: SDPA (dispatch) path against the explicit softmax path.

Prints one JSON object. Example:

    python benchmarks/bench_attention.py --grids 16 32 --widths S B --batch_size 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from diffit_diffusers import TimeDependentExplicitAttnProcessor, TimeDependentSelfAttention, load_preset_config


def preset_width(name: str) -> tuple[int, int]:
    """(hidden width, heads) of a DiffiT latent preset."""
    config = load_preset_config(f"DiffiT-{name}/2")
    return config["num_attention_heads"] * config["attention_head_dim"], config["num_attention_heads"]


def time_interleaved(fns: dict, repeats: int, warmup: int, sync) -> dict[str, float]:
    """Median seconds per call of each function, calling them in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32], help="token grid sides (global windows)")
    parser.add_argument("--widths", nargs="+", default=["S", "B"], choices=["S", "B", "L", "XL"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for width_name in args.widths:
        dim, heads = preset_width(width_name)
        for grid in args.grids:
            torch.manual_seed(0)
            sdpa = TimeDependentSelfAttention(dim, dim, heads, window_size=grid).to(device, dtype).eval()
            explicit = TimeDependentSelfAttention(dim, dim, heads, window_size=grid).to(device, dtype).eval()
            explicit.load_state_dict(sdpa.state_dict())
            explicit.set_processor(TimeDependentExplicitAttnProcessor())
            x = torch.randn(args.batch_size, grid * grid, dim, device=device, dtype=dtype)
            t = torch.randn(args.batch_size, dim, device=device, dtype=dtype)
            with torch.inference_mode():
                max_diff = (sdpa(x, t, grid, grid) - explicit(x, t, grid, grid)).abs().max().item()
                timings = time_interleaved(
                    {"sdpa": lambda: sdpa(x, t, grid, grid), "explicit": lambda: explicit(x, t, grid, grid)},
                    args.repeats,
                    args.warmup,
                    sync,
                )
            results.append(
                {
                    "width": f"DiffiT-{width_name}",
                    "dim": dim,
                    "heads": heads,
                    "grid": grid,
                    "sdpa_ms": round(timings["sdpa"] * 1e3, 3),
                    "explicit_ms": round(timings["explicit"] * 1e3, 3),
                    "sdpa_speedup": round(timings["explicit"] / timings["sdpa"], 3),
                    "max_abs_diff": max_diff,
                }
            )
    report = {
        "benchmark": "tmsa_forward",
        "device": str(device),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
