"""Convert NVIDIA's released latent DiffiT checkpoints (``nvidia/DiffiT``: ``diffit_256.safetensors``,
``diffit_512.safetensors``) into a complete ``DiffiTPipeline`` folder (or only the transformer).

Usage::

    python -m diffit_diffusers.convert_nvlabs --checkpoint diffit_256.safetensors --output_dir diffit-xl-2-256
    python -m diffit_diffusers.convert_nvlabs --checkpoint diffit_256.safetensors --output_dir t --transformer_only

The checkpoint may be a local file, ``hf://nvidia/DiffiT/diffit_256.safetensors`` or a Hub URL. Reading, config
inference and key renaming are ``DiffiTTransformer2DModel.from_single_file`` and
``DiffiTPipeline.from_single_file`` (``diffit_diffusers.loaders.single_file``); this module saves the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .hub import create_model_card
from .loaders.single_file import DEFAULT_VAE, NVIDIA_REPO_ID, CheckpointConversionError, describe_config
from .models import DiffiTTransformer2DModel
from .pipelines import DiffiTPipeline
from .utils import TORCH_DTYPES


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointConversionError(f"The output folder {str(output_dir)!r} is an existing file; give a folder.")


def convert_checkpoint(
    checkpoint: str | Path, output_dir: str | Path, *, dtype: torch.dtype | None = None
) -> DiffiTTransformer2DModel:
    """Convert an official checkpoint and save only the transformer (``save_pretrained``, safetensors).

    Args:
        checkpoint: a local file, ``hf://`` URI or Hub URL (see ``DiffiTTransformer2DModel.from_single_file``).
        output_dir: the folder to write.
        dtype: cast the weights; by default they keep the checkpoint's dtype.

    Returns:
        The converted model, in eval mode.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    model = DiffiTTransformer2DModel.from_single_file(str(checkpoint), torch_dtype=dtype)
    model.save_pretrained(output_dir, safe_serialization=True)
    return model


def convert_to_pipeline(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    vae: str | Path = DEFAULT_VAE,
    dtype: torch.dtype | None = None,
) -> DiffiTPipeline:
    """Convert an official checkpoint into a complete ``DiffiTPipeline`` folder with a model card.

    The pipeline is ``DiffiTPipeline.from_single_file(checkpoint, vae=vae)``: the transformer, a DDPM scheduler
    with the ADM/DiT schedule and learned variance, the VAE (``vae``: a local folder or Hub id), the ImageNet
    label names (for 1000-class models) and the official sampling recipe as the pipeline's defaults.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    pipeline = DiffiTPipeline.from_single_file(str(checkpoint), vae=vae, torch_dtype=dtype)
    pipeline.save_pretrained(output_dir)
    transformer, autoencoder = pipeline.denoiser, pipeline.vae
    resolution = transformer.config.sample_size * 2 ** (len(autoencoder.config.block_out_channels) - 1)
    create_model_card(
        output_dir,
        base_model=NVIDIA_REPO_ID,
        license="cc-by-nc-sa-4.0",
        datasets=["imagenet-1k"] if transformer.config.num_classes == 1000 else None,
        tags=["class-conditional", "latent-diffusion", f"{resolution}px"],
        pipeline_tag="unconditional-image-generation",
        config=dict(transformer.config),
        extra_text=(
            f"Converted from NVIDIA's released latent DiffiT checkpoint ({Path(str(checkpoint)).name}, "
            f"{resolution}x{resolution}) with `python -m diffit_diffusers.convert_nvlabs`.\n\n"
            "**Licence of the weights:** NVIDIA released these weights under CC-BY-NC-SA-4.0 (non-commercial, "
            "share-alike); the converted weights carry the same licence. The diffit-diffusers code is Apache-2.0."
        ),
    )
    return pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffit_diffusers.convert_nvlabs",
        description="Convert an NVlabs latent DiffiT checkpoint (e.g. diffit_256.safetensors from nvidia/DiffiT) "
        "into a diffusers DiffiTPipeline (or DiffiTTransformer2DModel) folder.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="official .safetensors (or .pt/.pth state dict) file: a local path, hf://<repo>/<file> or a Hub URL",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write the pipeline (or transformer) to")
    parser.add_argument(
        "--vae", default=DEFAULT_VAE, help=f"AutoencoderKL folder or Hub id for the pipeline (default {DEFAULT_VAE})"
    )
    parser.add_argument(
        "--transformer_only", action="store_true", help="write only the transformer folder, no pipeline"
    )
    parser.add_argument(
        "--dtype", choices=sorted(TORCH_DTYPES), default=None, help="cast the weights (default: keep the checkpoint's)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 for a checkpoint or path problem)."""
    args = build_parser().parse_args(argv)
    dtype = TORCH_DTYPES[args.dtype] if args.dtype else None
    try:
        if args.transformer_only:
            model = convert_checkpoint(args.checkpoint, args.output_dir, dtype=dtype)
        else:
            model = convert_to_pipeline(args.checkpoint, args.output_dir, vae=args.vae, dtype=dtype).denoiser
    except (FileNotFoundError, CheckpointConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    what = "DiffiTTransformer2DModel" if args.transformer_only else "DiffiTPipeline with DiffiTTransformer2DModel"
    print(f"Saved {what} ({describe_config(model.config)}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
