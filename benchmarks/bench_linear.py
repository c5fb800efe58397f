"""PyTorch's float32 linear layer (MKL on the CPU) against ``OneDNNLinear`` (a oneDNN 1x1 convolution) on the
products the DiffiT models and their peers run.

For every shape: the median time of a forward and of a forward + backward (input, weight and bias gradients) over
interleaved rounds, the achieved GFLOP/s (multiply and add counted as two FLOPs) and the speed-up. Shapes are
``rows x in_features -> out_features``: the `tiny` U-Net's TMSA and MLP products at 16x16 and 8x8 (batch 32),
``cifar10-32``'s at 32x32 (batch 8), DiffiT-S/2's and DiffiT-B/2's (256 tokens, batch 8 and 4), and products below
``OneDNNLinear``'s thresholds, which it leaves to ``nn.Linear``. Every shape is timed on both paths;
``runs_on_onednn`` says whether this machine's rule (``onednn_min_features()``) puts it on oneDNN.

    python benchmarks/bench_linear.py --output benchmarks/results/cpu-linear.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from harness import interleaved_samples, machine_info, median_round_ratio, write_report
from torch import nn

from diffit_diffusers.models.linear import MACHINE_MIN_FEATURES, MIN_MULTIPLY_ADDS, MIN_ROWS, ROWS_PER_MAP, OneDNNLinear


SHAPES = {
    "tiny 16x16 TMSA projection": (8192, 32, 32),
    "tiny 16x16 MLP in": (8192, 32, 64),
    "tiny 8x8 TMSA projection": (2048, 64, 64),
    "tiny 8x8 MLP in": (2048, 64, 128),
    "cifar10-32 32x32 TMSA projection": (8192, 128, 128),
    "cifar10-32 32x32 MLP in": (8192, 128, 512),
    "S/2 TMSA projection": (2048, 384, 384),
    "S/2 MLP in": (2048, 384, 1536),
    "S/2 MLP out": (2048, 1536, 384),
    "B/2 MLP in (batch 4)": (1024, 768, 3072),
    "below the row threshold (sampling one image)": (256, 384, 1536),
    "below the multiply-add threshold": (2048, 32, 32),
}


def measure(rows: int, in_features: int, out_features: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = nn.Linear(in_features, out_features)
    layer = OneDNNLinear.from_linear(reference)
    layer.use_onednn = True
    inputs = torch.randn(rows, in_features, requires_grad=True)
    grad_output = torch.randn(rows, out_features)
    runs_on_onednn = layer.runs_on_onednn(inputs)  # with this machine's min_features
    layer.min_features = 1  # time every shape on both paths

    def forward(module):
        def run():
            with torch.no_grad():
                module(inputs)

        return run

    def training(module):
        def run():
            module(inputs).backward(grad_output)

        return run

    row: dict[str, Any] = {"rows": rows, "in_features": in_features, "out_features": out_features,
                           "runs_on_onednn": runs_on_onednn}
    for name, make, flops in (("forward", forward, 2), ("forward_backward", training, 6)):
        samples = interleaved_samples({"linear": make(reference), "onednn": make(layer)}, repeats, torch.device("cpu"), 3)
        linear_s, onednn_s = statistics.median(samples["linear"]), statistics.median(samples["onednn"])
        total = flops * rows * in_features * out_features
        row[name] = {
            "linear_ms": linear_s * 1e3,
            "onednn_linear_ms": onednn_s * 1e3,
            "linear_gflops": total / linear_s / 1e9,
            "onednn_linear_gflops": total / onednn_s / 1e9,
            "speedup": median_round_ratio(samples, "linear", "onednn"),
        }
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per shape (default: 15)")
    parser.add_argument("--output", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be a positive integer.")
    report = {
        "benchmark": "linear",
        "machine": machine_info(torch.device("cpu")),
        "settings": {
            "dtype": "float32",
            "repeats": args.repeats,
            "onednn_by_default_here": MACHINE_MIN_FEATURES is not None,
            "thresholds": {"rows_per_map": ROWS_PER_MAP, "min_rows": MIN_ROWS, "min_multiply_adds": MIN_MULTIPLY_ADDS},
        },
        "shapes": {name: measure(*shape, args.repeats) for name, shape in SHAPES.items()},
    }
    write_report(report, args.output)
    return report


if __name__ == "__main__":
    main()
