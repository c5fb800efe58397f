"""Command line of ``examples/evaluate.py``: sample a saved pipeline and report FID/FD, KID, precision/recall and IS."""

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .pipeline_evaluation import CLASS_LABEL_MODES, build_feature_extractor, evaluate_pipeline
from ..dataset_sources import looks_like_local_path
from .reference import compute_reference_statistics
from .statistics import FeatureReservoir
from ..utils import TORCH_DTYPES


# Errors a user can fix (bad paths, files, settings); anything else keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError)
# Other processes wait in a collective while the main process computes the reference statistics, which can take
# longer than torch's default process-group timeout for large datasets.
COLLECTIVE_TIMEOUT = timedelta(hours=3)


def _integer_at_least(minimum: int, description: str) -> Callable[[str], int]:
    """An argparse ``type`` that parses an integer >= ``minimum``; ``description`` names the range in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {description} integer, got {text!r}")
        return value

    return parse


_positive_int = _integer_at_least(1, "positive")
_non_negative_int = _integer_at_least(0, "non-negative")


def _class_labels(text: str) -> Union[str, List[int]]:
    if text in CLASS_LABEL_MODES:
        return text
    try:
        return [int(label) for label in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'balanced', 'random' or comma-separated class ids such as '0,3,7', got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the evaluation command line."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=(
            "Sample a DiffiT pipeline and compare the samples with reference images: Frechet distance (FID with the "
            "Inception extractor), optionally KID, precision/recall and Inception Score. Run with `accelerate launch` to "
            "sample on several GPUs; the report does not depend on the number of processes."
        ),
    )
    parser.add_argument("--pipeline", required=True, help="Saved pipeline folder or Hub repo id.")
    parser.add_argument(
        "--torch_dtype", choices=sorted(TORCH_DTYPES), default="float32", help="Dtype the pipeline samples in."
    )
    parser.add_argument("--num_samples", type=_positive_int, required=True, help="Number of samples (e.g. 50000).")
    parser.add_argument("--batch_size", type=_positive_int, default=64, help="Samples per batch and process.")
    parser.add_argument(
        "--num_inference_steps", type=_positive_int, default=None, help="Denoising steps (default: the pipeline's)."
    )
    parser.add_argument(
        "--guidance_scale", type=float, default=None, help="Classifier-free guidance scale (default: the pipeline's)."
    )
    parser.add_argument(
        "--guidance_schedule",
        choices=["constant", "power_cosine"],
        default=None,
        help="Guidance schedule (default: the pipeline's).",
    )
    parser.add_argument(
        "--class_labels",
        type=_class_labels,
        default="balanced",
        help="'balanced' (sample i gets class i %% num_classes), 'random', or comma-separated class ids cycled over "
        "the samples. Ignored by unconditional pipelines.",
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="Seed of the samples and subsets.")

    reference = parser.add_argument_group("reference images")
    reference.add_argument(
        "--reference",
        required=True,
        help="Reference statistics (.npz with mu/sigma), an .npz image batch (arr_0), an image folder, a local "
        "dataset (file or folder) or a Hub dataset id.",
    )
    reference.add_argument("--reference_split", default="train", help="Dataset split of the reference.")
    reference.add_argument("--reference_image_column", default="image", help="Dataset column holding the images.")
    reference.add_argument(
        "--reference_max_samples", type=_positive_int, default=None, help="Use at most this many reference images."
    )
    reference.add_argument(
        "--reference_resolution",
        type=_positive_int,
        default=None,
        help="Resize the shorter side and centre-crop reference images to this size (needed for mixed sizes).",
    )
    reference.add_argument("--reference_streaming", action="store_true", help="Stream a Hub dataset reference.")
    reference.add_argument(
        "--save_reference_statistics",
        default=None,
        help="Write the reference statistics to this .npz to reuse them as --reference later.",
    )

    metrics = parser.add_argument_group("features and metrics")
    metrics.add_argument(
        "--feature_extractor",
        default="inception",
        help="'inception' (the standard FID Inception-v3, needs torch-fidelity) or 'module:FILE', a network saved "
        "with torch.jit.save or torch.save(model). A torch.save file is unpickled with weights_only=False, which "
        "can run arbitrary code: only pass files you trust.",
    )
    metrics.add_argument("--inception_weights", default=None, help="Local Inception weights file (offline use).")
    metrics.add_argument(
        "--feature_layer",
        default=None,
        help="With module:FILE, the submodule whose output are the features (e.g. a classifier's penultimate "
        "layer); with --inception_score the module's output serve as class logits.",
    )
    metrics.add_argument("--precision_recall", action="store_true", help="Compute k-NN precision and recall.")
    metrics.add_argument("--kid", action="store_true", help="Compute the Kernel Inception Distance.")
    metrics.add_argument("--kid_subsets", type=_positive_int, default=100, help="Random subsets KID averages over.")
    metrics.add_argument(
        "--kid_subset_size", type=_positive_int, default=1000, help="Features per KID subset (at most those kept)."
    )
    metrics.add_argument(
        "--max_feature_samples",
        type=_positive_int,
        default=10000,
        help="Real and generated features kept for precision/recall and KID.",
    )
    metrics.add_argument("--inception_score", action="store_true", help="Compute the Inception Score.")
    metrics.add_argument(
        "--inception_score_splits", type=_positive_int, default=10, help="Chunks of the Inception Score."
    )

    output = parser.add_argument_group("output")
    output.add_argument("--output", default=None, help="Write the JSON report to this file.")
    output.add_argument("--save_samples", default=None, help="Also save every sample as a PNG in this folder.")
    output.add_argument(
        "--device",
        choices=["auto", "cpu"],
        default="auto",
        help="'auto' uses the process's GPU when there is one (choose GPUs with CUDA_VISIBLE_DEVICES); 'cpu' forces "
        "the CPU.",
    )
    output.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    return parser


def _main_process_first(accelerator, function: Callable[[], Any], share_result: bool) -> Any:
    """
    Runs ``function`` on the main process first (e.g. one download or one pass over the reference), then either
    shares its result with the other processes or lets them run ``function`` too. An error on the main process is
    raised on every process instead of leaving the others waiting.
    """
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = function()
        except USER_ERRORS as error:
            if accelerator.num_processes == 1:
                raise
            outcome[1] = f"{type(error).__name__}: {error}"
    if accelerator.num_processes == 1:
        return outcome[0]
    from accelerate.utils import broadcast_object_list

    message = broadcast_object_list([outcome[1]])[0]
    if message is not None:
        raise ValueError(f"The main process failed: {message}")
    if share_result:
        return broadcast_object_list([outcome[0] if accelerator.is_main_process else None])[0]
    return outcome[0] if accelerator.is_main_process else function()


def _load_pipeline(name_or_path: str, torch_dtype: torch.dtype):
    from ..pipelines import DiffiTPipeline

    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"--pipeline {name_or_path!r} is a file; pass the saved pipeline folder.")
    if not os.path.exists(name_or_path) and looks_like_local_path(name_or_path):
        raise FileNotFoundError(f"Pipeline folder {name_or_path!r} does not exist.")
    try:
        return DiffiTPipeline.from_pretrained(name_or_path, torch_dtype=torch_dtype)
    except OSError as error:
        raise FileNotFoundError(f"Could not load the pipeline {name_or_path!r}: {error}") from error


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluates the pipeline as ``args`` (from ``build_parser``) describe; returns the report on every process."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if args.feature_layer is not None and not args.feature_extractor.startswith("module:"):
        raise ValueError("--feature_layer only applies to --feature_extractor module:FILE.")
    if args.inception_weights is not None and args.feature_extractor != "inception":
        raise ValueError("--inception_weights only applies to --feature_extractor inception.")
    if args.inception_score and args.feature_extractor != "inception" and args.feature_layer is None:
        raise ValueError(
            "--inception_score with a module extractor needs --feature_layer, so that the module's output can serve "
            "as class logits."
        )
    accelerator = Accelerator(
        cpu=args.device == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)]
    )
    pipeline = _main_process_first(
        accelerator, lambda: _load_pipeline(args.pipeline, TORCH_DTYPES[args.torch_dtype]), share_result=False
    )
    extractor = build_feature_extractor(
        args.feature_extractor,
        weights_path=args.inception_weights,
        feature_layer=args.feature_layer,
        output_is_logits=args.inception_score and args.feature_layer is not None,
        device=accelerator.device,
    )

    def reference_statistics():
        keeps_features = args.precision_recall or args.kid
        reservoir = FeatureReservoir(args.max_feature_samples, seed=args.seed) if keeps_features else None
        statistics = compute_reference_statistics(
            args.reference,
            extractor,
            image_column=args.reference_image_column,
            split=args.reference_split,
            streaming=args.reference_streaming,
            batch_size=args.batch_size,
            max_samples=args.reference_max_samples,
            resolution=args.reference_resolution,
            feature_reservoir=reservoir,
            show_progress=not args.no_progress,
        )
        if args.save_reference_statistics is not None:
            statistics.save(args.save_reference_statistics)
        return statistics, None if reservoir is None else reservoir.features

    reference, real_features = _main_process_first(accelerator, reference_statistics, share_result=True)
    return evaluate_pipeline(
        pipeline,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        extractor=extractor,
        reference=reference,
        real_features=real_features,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_schedule=args.guidance_schedule,
        class_labels=args.class_labels,
        seed=args.seed,
        accelerator=accelerator,
        compute_pr=args.precision_recall,
        compute_kid=args.kid,
        compute_is=args.inception_score,
        show_progress=not args.no_progress,
        save_samples_dir=args.save_samples,
        max_feature_samples=args.max_feature_samples,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        is_splits=args.inception_score_splits,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Parses ``argv`` (default: ``sys.argv[1:]``), evaluates, prints the JSON report and writes it to ``--output`` (on
    the main process) and returns it. Bad flags exit with status 2 and user errors (missing files, bad settings) with
    status 1, each with a one-line message instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    output = None if args.output is None else Path(args.output).expanduser()
    if output is not None and output.is_dir():
        parser.error(f"--output {args.output!r} is a folder; pass a file name such as report.json.")
    try:
        report = run(args)
        from accelerate import PartialState

        if PartialState().is_main_process:
            text = json.dumps(report, indent=2)
            if output is not None:
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(text + "\n")
            print(text)
    except USER_ERRORS as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    return report
