"""Single-file loading of NVIDIA's released latent DiffiT checkpoints (``nvidia/DiffiT``: ``diffit_256.safetensors``,
``diffit_512.safetensors``): resolve a local path or Hub URL, read the tensors, infer the config from their shapes
and rename every official key through one explicit table.

The official key names live in this module only. The two buffers our model recomputes (the sin-cos position
embedding and the relative position index) are checked against our own values before they are dropped.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import DDPMScheduler
from huggingface_hub import hf_hub_download, parse_hf_uri
from huggingface_hub.errors import HfUriError
from safetensors.torch import load_file

from ..models.attention import unfused_projection_items


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

#: The Hub repository of NVIDIA's released checkpoints.
NVIDIA_REPO_ID = "nvidia/DiffiT"
#: The VAE the released latent models were trained with (Stable Diffusion's EMA-finetuned autoencoder).
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: File suffixes of single-file checkpoints: NVIDIA's ``.safetensors`` and plain PyTorch state dicts.
TORCH_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_STATE_DICT_SUFFIXES)
POS_EMBED_ATOL = 1e-4

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


def infer_config(official_state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read the whole ``DiffiTTransformer2DModel`` config off the shapes of an official state dict.

    The last row of ``y_embedder.embedding_table`` is the null class, as in the released models.

    Args:
        official_state_dict: the NVlabs state dict (official key names).

    Returns:
        A config dict with every ``DiffiTTransformer2DModel.__init__`` argument.
    """
    from ..pipelines.denoiser_wrapper import scheduler_parameterization  # the pipelines import this module

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
    if label_table is None:
        num_classes, class_dropout_prob = None, 0.0
    elif label_table.shape[0] < 2:
        raise CheckpointConversionError(
            f"`y_embedder.embedding_table` has {label_table.shape[0]} rows; it needs at least one class and the "
            "null class."
        )
    else:
        num_classes, class_dropout_prob = label_table.shape[0] - 1, 0.1

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


def _empty_model(model_class: type, config: Mapping[str, Any]) -> torch.nn.Module:
    """``model_class`` for ``config`` with parameters on the meta device (no memory, no init) and real buffers."""
    try:
        with init_empty_weights(include_buffers=False):
            return model_class.from_config(dict(config))
    except ValueError as error:
        raise CheckpointConversionError(f"The checkpoint's shapes give an unusable DiffiT config: {error}") from error


def _check_recomputed_buffers(official_state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise if the official position embedding or relative position indices differ from what ``model`` computes."""
    if OFFICIAL_POS_EMBED in official_state_dict:
        theirs = official_state_dict[OFFICIAL_POS_EMBED].float()
        ours = model.pos_embed.pos_embed
        if theirs.shape != ours.shape:
            raise CheckpointConversionError(
                f"The checkpoint's `pos_embed` has shape {tuple(theirs.shape)}, the model's {tuple(ours.shape)}."
            )
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
        block = int(match[1])
        if block >= len(model.transformer_blocks):
            continue  # an extra block: reported with the other unknown keys
        ours = model.transformer_blocks[block].attn.relative_position_index
        if theirs.shape != ours.shape or not torch.equal(theirs.to(ours.dtype), ours):
            raise CheckpointConversionError(
                f"`{key}` (shape {tuple(theirs.shape)}) is not the Swin relative position index DiffiT recomputes "
                f"for a {model.grid_size}x{model.grid_size} grid (shape {tuple(ours.shape)})."
            )


def _rename_and_check(
    official_state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename every official parameter; raise one error listing all unknown, missing and misshapen keys."""
    expected = model.state_dict()
    converted, unknown, misshapen = {}, [], []
    for key, tensor in official_state_dict.items():
        if key == OFFICIAL_POS_EMBED or OFFICIAL_RELATIVE_POSITION_INDEX.fullmatch(key):
            continue
        # The official fused `qkv` / `qkv_temb` layers become our separate q, k, v projections.
        new_key = official_to_diffusers_key(key)
        parts = dict(unfused_projection_items(new_key, tensor)) if new_key is not None else {}
        if not parts or any(part_key not in expected for part_key in parts):
            unknown.append(key)
            continue
        part_shape = expected[next(iter(parts))].shape
        expected_shape = (len(parts) * part_shape[0], *part_shape[1:]) if part_shape else part_shape
        if tensor.shape != expected_shape:
            misshapen.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(expected_shape)}")
        converted.update((part_key, part.contiguous()) for part_key, part in parts.items())
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
            "The checkpoint does not match the latent DiffiT layout "
            f"({describe_config(model.config)}):\n  " + "\n  ".join(problems)
        )
    return converted


def describe_config(config: Mapping[str, Any]) -> str:
    """A one-line summary of a ``DiffiTTransformer2DModel`` config (depth, width, heads, patch, size, classes)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return (
        f"depth {config['num_layers']}, width {width}, {config['num_attention_heads']} heads, "
        f"patch {config['patch_size']}, sample size {config['sample_size']}, {config['num_classes']} classes"
    )


def _default_model_class() -> type:
    from ..models import DiffiTTransformer2DModel

    return DiffiTTransformer2DModel


def convert_state_dict(
    official_state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    model_class: type | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert an official latent DiffiT state dict to ours.

    Args:
        official_state_dict: the NVlabs state dict (official key names, tensors).
        config: the model config to convert for; by default ``infer_config(official_state_dict)``.
        model_class: the model class the keys are checked against (``DiffiTTransformer2DModel`` by default).

    Returns:
        ``(config, state_dict)``: the model config and a state dict that loads into it with ``strict=True``. The
        tensors are the input tensors (not copies).
    """
    config = dict(infer_config(official_state_dict) if config is None else config)
    model = _empty_model(model_class or _default_model_class(), config)
    _check_recomputed_buffers(official_state_dict, model)
    return config, _rename_and_check(official_state_dict, model)


def resolve_checkpoint_file(
    path_or_url: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
) -> Path:
    """The local path of a single-file checkpoint, downloading it through ``huggingface_hub`` if needed.

    Args:
        path_or_url: a local file, an ``hf://<repo>[@<revision>]/<file>`` URI or a Hub web URL
            (``https://huggingface.co/<repo>/blob/<revision>/<file>``).
        revision: the Hub revision when the URI names none.
    """
    if os.path.isfile(path_or_url):
        return Path(path_or_url)
    try:
        uri = parse_hf_uri(str(path_or_url))
    except HfUriError as error:
        raise FileNotFoundError(
            f"{str(path_or_url)!r} is neither an existing file nor a Hub file URL; give a local checkpoint path, "
            f"'hf://{NVIDIA_REPO_ID}/diffit_256.safetensors' or "
            f"'https://huggingface.co/{NVIDIA_REPO_ID}/blob/main/diffit_256.safetensors'."
        ) from error
    if not uri.path_in_repo or uri.type != "model":
        raise ValueError(
            f"{str(path_or_url)!r} does not name a file in a model repository; add the file name, e.g. "
            f"'hf://{NVIDIA_REPO_ID}/diffit_256.safetensors'."
        )
    return Path(
        hf_hub_download(
            uri.id,
            uri.path_in_repo,
            revision=uri.revision or revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=bool(local_files_only),
            force_download=force_download,
        )
    )


def load_checkpoint_file(checkpoint_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint: NVIDIA's ``.safetensors``, or a ``.pt``/``.pth``/``.bin``/``.ckpt`` file
    holding a plain state dict (a dict of tensors)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointConversionError(
            f"Cannot tell the format of {str(path)!r} from its extension; use a .safetensors file or one of "
            f"{', '.join(TORCH_STATE_DICT_SUFFIXES)} (a PyTorch state dict)."
        )
    try:
        if suffix == ".safetensors":
            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip each raise their own types for a damaged file
        raise CheckpointConversionError(
            f"Could not read checkpoint {str(path)!r}: {type(error).__name__}: {error}. The file is damaged, "
            "truncated, not in the format its extension says, or (for PyTorch files) holds objects other than "
            "tensors and plain containers."
        ) from error
    if not (
        isinstance(checkpoint, Mapping)
        and checkpoint
        and all(isinstance(key, str) and torch.is_tensor(value) for key, value in checkpoint.items())
    ):
        found = (
            f"top-level keys: {', '.join(repr(key) for key in list(checkpoint)[:20])}"
            if isinstance(checkpoint, Mapping)
            else f"a {type(checkpoint).__name__}"
        )
        raise CheckpointConversionError(
            f"{str(path)!r} is not a plain state dict of tensors ({found}). Save the model's `state_dict()` "
            "with official key names."
        )
    return dict(checkpoint)


def official_recipe(grid_size: int) -> dict[str, Any]:
    """The released sampling recipe as ``DiffiTPipeline`` defaults: 256px (grid 16) uses power-cosine guidance with
    scale 4.4, 512px (grid 32) a constant 1.49; both 250 DDPM steps with learned variance and 3 guided channels."""
    if grid_size >= 32:
        return {"default_guidance_scale": 1.49, "default_guidance_schedule": "constant"}
    return {"default_guidance_scale": 4.4, "default_guidance_schedule": "power_cosine", "default_guidance_power": 4.0}


#: The released sampling setup's step count and guided channels, shared by both resolutions.
OFFICIAL_SAMPLING_DEFAULTS = {"default_num_inference_steps": 250, "default_guided_channels": 3}


def official_scheduler(learned_variance: bool = True) -> DDPMScheduler:
    """ADM/DiT's 1000-step linear beta schedule with learned-range variance (``fixed_small`` for a denoiser that
    does not predict the variance)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=False,
    )


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), by class id."""
    names = (files("diffit_diffusers") / "data" / "imagenet_labels.txt").read_text(encoding="utf-8").splitlines()
    return dict(enumerate(names))


class FromOriginalDiffiTMixin:
    """Adds ``from_single_file`` (diffusers' single-file loading API) to ``DiffiTTransformer2DModel``."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        config: str | os.PathLike | None = None,
        subfolder: str | None = None,
        config_revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        **config_overrides: Any,
    ):
        """Load an NVIDIA checkpoint file (official key names) as this model, in eval mode.

        Args:
            pretrained_model_link_or_path_or_dict: a local ``.safetensors`` (or plain PyTorch state dict) file, an
                ``hf://<repo>[@<revision>]/<file>`` URI, a Hub URL such as
                ``https://huggingface.co/nvidia/DiffiT/blob/main/diffit_256.safetensors``, or the state dict itself.
            config: a diffusers model folder or Hub repo whose config to use (with ``subfolder`` and
                ``config_revision``) instead of reading the config off the tensor shapes.
            torch_dtype: cast the weights to this dtype (``dtype`` is an alias); by default they keep the file's.
            revision: the Hub revision of the file (``cache_dir``, ``token``, ``local_files_only`` and
                ``force_download`` are ``huggingface_hub``'s other download options).
            **config_overrides: config entries (``__init__`` arguments) that replace the inferred ones.

        Raises:
            CheckpointConversionError: the file cannot be read or does not fit a DiffiT config.
        """
        torch_dtype = dtype if dtype is not None else torch_dtype
        if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"`torch_dtype` must be a torch.dtype such as torch.bfloat16, got {torch_dtype!r}.")
        init_arguments = set(cls._get_init_keys(cls)) - {"self"}
        unknown = sorted(set(config_overrides) - init_arguments)
        if unknown:
            raise ValueError(
                f"`from_single_file` got unknown keyword arguments {unknown}; config overrides must be "
                f"{cls.__name__} arguments: {', '.join(sorted(init_arguments))}."
            )
        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
        if isinstance(pretrained_model_link_or_path_or_dict, Mapping):
            state_dict = dict(pretrained_model_link_or_path_or_dict)
        else:
            path = resolve_checkpoint_file(
                pretrained_model_link_or_path_or_dict, revision=revision, force_download=force_download, **hub_kwargs
            )
            state_dict = load_checkpoint_file(path)
        if config is None:
            model_config = infer_config(state_dict)
        else:
            model_config = cls.load_config(config, subfolder=subfolder, revision=config_revision, **hub_kwargs)
        model_config = {**model_config, **config_overrides}
        model_config, converted = convert_state_dict(state_dict, model_config, model_class=cls)
        if torch_dtype is not None:  # parameters only: the recomputed buffers stay float32, as in from_pretrained
            converted = {key: tensor.to(torch_dtype) for key, tensor in converted.items()}
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(model_config)
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval()
