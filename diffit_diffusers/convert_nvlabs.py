"""Convert NVIDIA's released latent DiffiT checkpoints (``nvidia/DiffiT``: ``diffit_256.safetensors``,
``diffit_512.safetensors``) into a complete ``DiffiTPipeline`` folder (or only the transformer).

Usage::

    python -m diffit_diffusers.convert_nvlabs --checkpoint diffit_256.safetensors --output_dir diffit-xl-2-256
    python -m diffit_diffusers.convert_nvlabs --checkpoint diffit_256.safetensors --output_dir t --transformer_only

The whole model config is read off the tensor shapes, every official key is renamed through one explicit table,
and the two buffers our model recomputes (the sin-cos position embedding and the relative position index) are
checked against our own values before they are dropped. The official key names live in this module only.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors.torch import load_file

from .hub import create_model_card
from .models import DiffiTTransformer2DModel
from .pipelines import DiffiTPipeline
from .pipelines.denoiser_wrapper import scheduler_parameterization


#: Official module or parameter name -> ours. ``{i}`` is a block index; the rest of a key (``.weight``,
#: ``.bias``) carries over unchanged. The table is a bijection, so it also maps our names back for error messages.
OFFICIAL_TO_DIFFUSERS_NAMES: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_embedding.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_embedding.timestep_embedder.linear_2"),
    ("y_embedder.embedding_table", "time_embedding.class_embedder.embedding_table"),
    ("blocks.{i}.attn.qkv", "transformer_blocks.{i}.attn.to_qkv"),
    ("blocks.{i}.attn.qkv_temb", "transformer_blocks.{i}.attn.time_to_qkv"),
    ("blocks.{i}.attn.proj", "transformer_blocks.{i}.attn.to_out"),
    ("blocks.{i}.attn.relative_position_bias_table", "transformer_blocks.{i}.attn.relative_position_bias_table"),
    ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("final_layer.linear", "proj_out"),
)

#: Official buffers that our model computes itself: checked against our values, then dropped.
OFFICIAL_POS_EMBED = "pos_embed"
OFFICIAL_RELATIVE_POSITION_INDEX = re.compile(r"blocks\.(\d+)\.attn\.relative_position_index")

#: Keys under which training scripts commonly nest a state dict, most preferred first (EMA weights sample best).
NESTING_KEYS: tuple[str, ...] = ("ema", "model", "state_dict", "model_state_dict", "module", "net")
#: Key prefixes added by ``DistributedDataParallel`` and ``torch.compile``.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")

#: The VAE the released latent models were trained with (Stable Diffusion's EMA-finetuned autoencoder).
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
POS_EMBED_ATOL = 1e-4
TORCH_LOAD_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


class CheckpointConversionError(ValueError):
    """A checkpoint that cannot be converted: unreadable, unexpected keys, or shapes that do not fit DiffiT."""


def _name_pattern(template: str) -> re.Pattern:
    """A regex matching ``template`` (``{i}`` = block index) as a whole key or as the prefix of ``<prefix>.<rest>``."""
    body = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body + r"(?P<rest>\..+)?")


_RENAME_RULES = tuple((_name_pattern(src), dst) for src, dst in OFFICIAL_TO_DIFFUSERS_NAMES)
_INVERSE_RENAME_RULES = tuple((_name_pattern(dst), src) for src, dst in OFFICIAL_TO_DIFFUSERS_NAMES)


def _rename(key: str, rules: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return template.format(i=match.groupdict().get("i")) + (match["rest"] or "")
    return None


def official_to_diffusers_key(key: str) -> str | None:
    """Our parameter name for an official one, or ``None`` if the official name is not in the table."""
    return _rename(key, _RENAME_RULES)


def diffusers_to_official_key(key: str) -> str | None:
    """The official parameter name for one of ours, or ``None`` if ours is not in the table."""
    return _rename(key, _INVERSE_RENAME_RULES)


def _require(state_dict: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise CheckpointConversionError(
            f"The checkpoint lacks {', '.join(missing)}, which the DiffiT config is read from. Is it an NVlabs "
            f"latent DiffiT state dict? Its keys start with: {_key_overview(state_dict)}."
        )


def _key_overview(state_dict: Mapping[str, Any]) -> str:
    roots = sorted({key.split(".")[0] for key in state_dict})
    return ", ".join(roots) if roots else "(no keys)"


def _grid_from_bias_table(rows: int) -> int:
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise CheckpointConversionError(
            f"`blocks.0.attn.relative_position_bias_table` has {rows} rows; a grid of side g needs (2g-1)^2 rows."
        )
    return (side + 1) // 2


def infer_config(official_state_dict: Mapping[str, torch.Tensor], *, num_classes: int | None = None) -> dict:
    """Read the whole ``DiffiTTransformer2DModel`` config off the shapes of an official state dict.

    Args:
        official_state_dict: the NVlabs state dict (official key names).
        num_classes: the number of classes, only needed for a label table *without* a null row. By default the
            last row of ``y_embedder.embedding_table`` is taken as the null class (the released models).

    Returns:
        A config dict with every ``DiffiTTransformer2DModel.__init__`` argument.
    """
    sd = official_state_dict
    _require(
        sd,
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "blocks.0.attn.relative_position_bias_table",
        "blocks.0.mlp.fc1.weight",
        "final_layer.linear.weight",
    )
    hidden_size, in_channels, patch_size, patch_width = sd["x_embedder.proj.weight"].shape
    if patch_size != patch_width:
        raise CheckpointConversionError(
            f"`x_embedder.proj.weight` has a {patch_size}x{patch_width} kernel; DiffiT uses square patches."
        )

    bias_rows, num_heads = sd["blocks.0.attn.relative_position_bias_table"].shape
    grid_size = _grid_from_bias_table(bias_rows)
    if OFFICIAL_POS_EMBED in sd:
        pos_embed_shape = tuple(sd[OFFICIAL_POS_EMBED].shape)
        if pos_embed_shape != (1, grid_size * grid_size, hidden_size):
            raise CheckpointConversionError(
                f"`pos_embed` has shape {pos_embed_shape}, but the relative position bias table ({bias_rows} rows) "
                f"and the patch embedding imply a {grid_size}x{grid_size} grid of width {hidden_size}: "
                f"expected (1, {grid_size * grid_size}, {hidden_size})."
            )
    if hidden_size % num_heads:
        raise CheckpointConversionError(
            f"The hidden width {hidden_size} is not divisible by the {num_heads} heads of the bias table."
        )

    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden_size
    if int(hidden_size * mlp_ratio) != mlp_hidden:
        raise CheckpointConversionError(
            f"`blocks.0.mlp.fc1` widens {hidden_size} to {mlp_hidden} channels, which no MLP ratio reproduces."
        )

    final_rows = sd["final_layer.linear.weight"].shape[0]
    if final_rows % (patch_size * patch_size):
        raise CheckpointConversionError(
            f"`final_layer.linear` has {final_rows} outputs, not a multiple of patch_size^2 = {patch_size**2}."
        )
    total_out_channels = final_rows // (patch_size * patch_size)
    learn_sigma = total_out_channels == 2 * in_channels
    out_channels = None if learn_sigma or total_out_channels == in_channels else total_out_channels

    label_table = sd.get("y_embedder.embedding_table.weight")
    label_rows = None if label_table is None else label_table.shape[0]
    if label_rows is None:
        if num_classes is not None:
            raise CheckpointConversionError(
                f"`num_classes={num_classes}` was given but the checkpoint has no `y_embedder.embedding_table`."
            )
        class_dropout_prob = 0.0
    elif num_classes is None or label_rows == num_classes + 1:
        num_classes, class_dropout_prob = label_rows - 1, 0.1
    elif label_rows == num_classes:
        class_dropout_prob = 0.0
    else:
        raise CheckpointConversionError(
            f"`y_embedder.embedding_table` has {label_rows} rows, which fits neither {num_classes} classes "
            f"(expected {num_classes}) nor {num_classes} classes plus a null class (expected {num_classes + 1})."
        )
    if num_classes is not None and num_classes < 1:
        raise CheckpointConversionError(f"`y_embedder.embedding_table` has {label_rows} rows; it needs at least 2.")

    block_indices = {int(m[1]) for key in sd if (m := _BLOCK_KEY.match(key))}
    return {
        "sample_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": max(block_indices) + 1,
        "num_attention_heads": num_heads,
        "attention_head_dim": hidden_size // num_heads,
        "mlp_ratio": mlp_ratio,
        "num_classes": num_classes,
        "class_dropout_prob": class_dropout_prob,
        "learn_sigma": learn_sigma,
        "time_proj_dim": sd["t_embedder.mlp.0.weight"].shape[1],
        "activation_fn": "gelu-approximate",
        "norm_eps": 1e-6,
        "dropout": 0.0,
        **scheduler_parameterization(official_scheduler()),
    }


def _empty_model(config: dict) -> DiffiTTransformer2DModel:
    """The model for ``config`` with parameters on the meta device (no memory, no init) and real buffers."""
    try:
        with init_empty_weights(include_buffers=False):
            return DiffiTTransformer2DModel.from_config(config)
    except ValueError as error:
        raise CheckpointConversionError(f"The checkpoint's shapes give an unusable DiffiT config: {error}") from error


def _check_recomputed_buffers(
    official_state_dict: Mapping[str, torch.Tensor], model: DiffiTTransformer2DModel
) -> None:
    """Raise if the official position embedding or relative position indices differ from what ``model`` computes."""
    if OFFICIAL_POS_EMBED in official_state_dict:
        theirs = official_state_dict[OFFICIAL_POS_EMBED].float()
        ours = model.pos_embed.pos_embed
        max_diff = (theirs - ours).abs().max().item()
        if not max_diff <= POS_EMBED_ATOL:
            raise CheckpointConversionError(
                f"The checkpoint's `pos_embed` differs from the 2D sin-cos embedding DiffiT recomputes by up to "
                f"{max_diff:.3g} (tolerance {POS_EMBED_ATOL}); the checkpoint was not made by the official code."
            )
    for key, theirs in official_state_dict.items():
        match = OFFICIAL_RELATIVE_POSITION_INDEX.fullmatch(key)
        if match is None:
            continue
        ours = model.transformer_blocks[int(match[1])].attn.relative_position_index
        if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
            raise CheckpointConversionError(
                f"`{key}` (shape {tuple(theirs.shape)}) is not the Swin relative position index DiffiT recomputes "
                f"for a {model.grid_size}x{model.grid_size} grid (shape {tuple(ours.shape)})."
            )


def _rename_and_check(
    official_state_dict: Mapping[str, torch.Tensor], model: DiffiTTransformer2DModel
) -> dict[str, torch.Tensor]:
    """Rename every official parameter; raise one error listing all unknown, missing and misshapen keys."""
    expected = model.state_dict()
    converted, unknown, misshapen = {}, [], []
    for key, tensor in official_state_dict.items():
        if key == OFFICIAL_POS_EMBED or OFFICIAL_RELATIVE_POSITION_INDEX.fullmatch(key):
            continue
        new_key = official_to_diffusers_key(key)
        if new_key not in expected:
            unknown.append(key)
            continue
        if tensor.shape != expected[new_key].shape:
            misshapen.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(expected[new_key].shape)}")
        converted[new_key] = tensor.contiguous()
    missing = [diffusers_to_official_key(key) or key for key in expected if key not in converted]

    problems = []
    if unknown:
        problems.append(f"unknown keys ({len(unknown)}): {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if misshapen:
        problems.append(f"shape mismatches ({len(misshapen)}): {'; '.join(misshapen)}")
    if problems:
        raise CheckpointConversionError(
            "The checkpoint does not match the latent DiffiT layout inferred from its shapes "
            f"({_describe(model.config)}):\n  " + "\n  ".join(problems)
        )
    return converted


def _describe(config: Mapping[str, Any]) -> str:
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return (
        f"depth {config['num_layers']}, width {width}, {config['num_attention_heads']} heads, "
        f"patch {config['patch_size']}, sample size {config['sample_size']}, {config['num_classes']} classes"
    )


def convert_state_dict(
    official_state_dict: Mapping[str, torch.Tensor], *, num_classes: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert an official latent DiffiT state dict to ours.

    Args:
        official_state_dict: the NVlabs state dict (official key names, tensors).
        num_classes: see ``infer_config``.

    Returns:
        ``(config, state_dict)``: the ``DiffiTTransformer2DModel`` config and a state dict that loads into it
        with ``strict=True``. The tensors are the input tensors (not copies).
    """
    config = infer_config(official_state_dict, num_classes=num_classes)
    model = _empty_model(config)
    _check_recomputed_buffers(official_state_dict, model)
    return config, _rename_and_check(official_state_dict, model)


def _is_state_dict(candidate: Any) -> bool:
    return (
        isinstance(candidate, Mapping)
        and len(candidate) > 0
        and all(isinstance(key, str) and torch.is_tensor(value) for key, value in candidate.items())
    )


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def find_state_dict(checkpoint: Any, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint: the object itself, or one nested under a common key
    (``"ema"`` first, then ``"model"``, ``"state_dict"``, ...), with ``module.``/``_orig_mod.`` prefixes removed."""
    candidate = checkpoint
    for _ in range(3):
        if _is_state_dict(candidate):
            return _strip_wrapper_prefixes(dict(candidate))
        if not isinstance(candidate, Mapping):
            break
        nesting_key = next((key for key in NESTING_KEYS if isinstance(candidate.get(key), Mapping)), None)
        if nesting_key is None:
            break
        candidate = candidate[nesting_key]
    if isinstance(checkpoint, Mapping):
        found = f"top-level keys: {', '.join(repr(key) for key in list(checkpoint)[:20])}"
    else:
        found = f"a {type(checkpoint).__name__}, not a dict"
    raise CheckpointConversionError(
        f"Found no state dict of tensors in {source} ({found}). Expected a dict of tensors, possibly nested "
        f"under one of {', '.join(repr(key) for key in NESTING_KEYS)}."
    )


def load_official_state_dict(checkpoint_path: str | Path) -> dict[str, torch.Tensor]:
    """Load an official checkpoint (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` holding a state dict)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        loader = load_file
    elif suffix in TORCH_LOAD_SUFFIXES:

        def loader(file: Path) -> Any:
            return torch.load(file, map_location="cpu", weights_only=True)

    else:
        raise CheckpointConversionError(
            f"Cannot tell the format of {str(path)!r} from its extension; use a .safetensors file or one of "
            f"{', '.join(TORCH_LOAD_SUFFIXES)} (a PyTorch state dict)."
        )
    try:
        checkpoint = loader(path)
    except Exception as error:  # safetensors, pickle and zip each raise their own types for a damaged file
        raise CheckpointConversionError(
            f"Could not read checkpoint {str(path)!r}: {type(error).__name__}: {error}. The file is damaged, "
            "truncated, not in the format its extension says, or (for PyTorch files) holds objects other than "
            "tensors and plain containers."
        ) from error
    return find_state_dict(checkpoint, source=repr(str(path)))


def load_converted_transformer(
    checkpoint_path: str | Path, *, dtype: torch.dtype | None = None, num_classes: int | None = None
) -> DiffiTTransformer2DModel:
    """Convert an official checkpoint file into a ``DiffiTTransformer2DModel`` in memory (eval mode).

    Args:
        checkpoint_path: the official ``.safetensors`` (or PyTorch) checkpoint.
        dtype: cast the weights to this dtype; by default they keep the checkpoint's dtype.
        num_classes: see ``infer_config``.
    """
    config, state_dict = convert_state_dict(load_official_state_dict(checkpoint_path), num_classes=num_classes)
    with init_empty_weights(include_buffers=False):
        model = DiffiTTransformer2DModel.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointConversionError(f"The output folder {str(output_dir)!r} is an existing file; give a folder.")


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> DiffiTTransformer2DModel:
    """Convert an official checkpoint and save only the transformer (``save_pretrained``, safetensors).

    Returns:
        The converted model, in eval mode.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    model = load_converted_transformer(checkpoint_path, dtype=dtype, num_classes=num_classes)
    model.save_pretrained(output_dir, safe_serialization=True)
    return model


def official_recipe(grid_size: int) -> dict[str, Any]:
    """The released sampling recipe as ``DiffiTPipeline`` defaults: 256px (grid 16) uses power-cosine guidance with
    scale 4.4, 512px (grid 32) a constant 1.49; both 250 DDPM steps with learned variance and 3 guided channels."""
    if grid_size >= 32:
        return {"default_guidance_scale": 1.49, "default_guidance_schedule": "constant"}
    return {"default_guidance_scale": 4.4, "default_guidance_schedule": "power_cosine", "default_guidance_power": 4.0}


def official_scheduler() -> DDPMScheduler:
    """ADM/DiT's 1000-step linear beta schedule with learned-range variance."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        variance_type="learned_range",
        clip_sample=False,
    )


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), by class id."""
    names = (files("diffit_diffusers") / "data" / "imagenet_labels.txt").read_text(encoding="utf-8").splitlines()
    return dict(enumerate(names))


def convert_to_pipeline(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    *,
    vae: str | Path = DEFAULT_VAE,
    dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> DiffiTPipeline:
    """Convert an official checkpoint into a complete ``DiffiTPipeline`` folder with a model card.

    The folder holds the transformer, a DDPM scheduler with the ADM/DiT schedule and learned variance, the VAE
    (``vae``: a local folder or Hub id), the ImageNet label names (for 1000-class models) and the official sampling
    recipe as the pipeline's defaults (see ``official_recipe``).
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir)
    transformer = load_converted_transformer(checkpoint_path, dtype=dtype, num_classes=num_classes)
    try:
        autoencoder = AutoencoderKL.from_pretrained(str(vae), torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise CheckpointConversionError(
            f"Could not load the VAE {str(vae)!r} ({error}). Pass `--vae` with a local AutoencoderKL folder or a "
            "reachable Hub id."
        ) from error
    if autoencoder.config.latent_channels != transformer.config.in_channels:
        raise CheckpointConversionError(
            f"The VAE has {autoencoder.config.latent_channels} latent channels but the transformer expects "
            f"{transformer.config.in_channels}; pass the VAE the checkpoint was trained with."
        )
    pipeline = DiffiTPipeline(
        denoiser=transformer,
        scheduler=official_scheduler(),
        vae=autoencoder,
        id2label=imagenet_id2label() if transformer.config.num_classes == 1000 else None,
        default_num_inference_steps=250,
        default_guided_channels=3,
        **official_recipe(transformer.grid_size),
    )
    pipeline.save_pretrained(output_dir)
    resolution = transformer.config.sample_size * 2 ** (len(autoencoder.config.block_out_channels) - 1)
    create_model_card(
        output_dir,
        base_model="nvidia/DiffiT",
        license="cc-by-nc-sa-4.0",
        datasets=["imagenet-1k"] if transformer.config.num_classes == 1000 else None,
        tags=["class-conditional", "latent-diffusion", f"{resolution}px"],
        pipeline_tag="unconditional-image-generation",
        config=dict(transformer.config),
        extra_text=(
            f"Converted from NVIDIA's released latent DiffiT checkpoint ({Path(checkpoint_path).name}, "
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
        "into a diffusers DiffiTTransformer2DModel folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="official .safetensors (or .pt/.pth state dict) file")
    parser.add_argument("--output_dir", required=True, help="folder to write the pipeline (or transformer) to")
    parser.add_argument(
        "--vae", default=DEFAULT_VAE, help=f"AutoencoderKL folder or Hub id for the pipeline (default {DEFAULT_VAE})"
    )
    parser.add_argument(
        "--transformer_only", action="store_true", help="write only the transformer folder, no pipeline"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep the checkpoint's)"
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="number of classes; only needed when the label table has no null-class row",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 for a checkpoint or path problem)."""
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.transformer_only:
            model = convert_checkpoint(args.checkpoint, args.output_dir, dtype=dtype, num_classes=args.num_classes)
        else:
            model = convert_to_pipeline(
                args.checkpoint, args.output_dir, vae=args.vae, dtype=dtype, num_classes=args.num_classes
            ).denoiser
    except (FileNotFoundError, CheckpointConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    what = "DiffiTTransformer2DModel" if args.transformer_only else "DiffiTPipeline with DiffiTTransformer2DModel"
    print(f"Saved {what} ({_describe(model.config)}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
