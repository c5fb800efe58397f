"""Converter for NVIDIA's released latent DiffiT checkpoints, checked against a transcription of the official model."""

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from torch import nn

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel
from diffit_diffusers.convert_nvlabs import convert_checkpoint, convert_to_pipeline, main
from diffit_diffusers.loaders.single_file import (
    CheckpointConversionError,
    convert_state_dict,
    imagenet_id2label,
    infer_config,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# A plain-PyTorch transcription of the official latent DiffiT (spec section 4), with the official parameter names.
# ---------------------------------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """``[sin, cos]`` features of ``positions`` (M,) at frequencies ``10000^(-2k/D)``: (M, D)."""
    frequencies = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = positions.reshape(-1)[:, None] * frequencies[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT/MAE fixed 2D position embedding for a row-major ``grid_size^2`` grid: (grid_size^2, embed_dim).

    ``np.meshgrid(w, h)`` puts the column coordinate first; the first half of the channels encodes it.
    """
    coords = np.arange(grid_size, dtype=np.float32)
    first, second = np.meshgrid(coords, coords)  # first[r, c] = c, second[r, c] = r
    return np.concatenate([sincos_1d(embed_dim // 2, first), sincos_1d(embed_dim // 2, second)], axis=1)


def swin_relative_position_index(grid_size: int) -> torch.Tensor:
    """``(dh + g - 1) * (2g - 1) + (dw + g - 1)`` for every pair of tokens of a row-major ``g x g`` grid."""
    rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
    dh = rows[:, None] - rows[None, :]
    dw = cols[:, None] - cols[None, :]
    return torch.from_numpy((dh + grid_size - 1) * (2 * grid_size - 1) + (dw + grid_size - 1))


class OfficialPatchEmbed(nn.Module):
    def __init__(self, in_channels, hidden_size, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)


class OfficialTimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_dim // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        angles = t[:, None].float() * frequencies[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class OfficialLabelEmbedder(nn.Module):
    def __init__(self, num_rows, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, hidden_size)


class OfficialAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, grid_size):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.qkv_temb = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", swin_relative_position_index(grid_size))

    def forward(self, x, c):
        b, n, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(x) + self.qkv_temb(c)[:, None]
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)
        weights = (q @ k.transpose(-2, -1) * head_dim**-0.5 + bias[None]).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, channels))


class OfficialMlp(nn.Module):
    def __init__(self, hidden_size, mlp_ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class OfficialBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, grid_size, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = OfficialAttention(hidden_size, num_heads, grid_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = OfficialMlp(hidden_size, mlp_ratio)

    def forward(self, x, c):
        x = x + self.attn(self.norm1(x), c)
        return x + self.mlp(self.norm2(x))


class OfficialFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x):
        return self.linear(nn.functional.silu(self.norm_final(x)))


class OfficialDiffiT(nn.Module):
    """Latent DiffiT as the spec describes the released model; ``num_classes=None`` drops the label table."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        num_classes=10,
        null_class=True,
        learn_sigma=True,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = OfficialPatchEmbed(in_channels, hidden_size, patch_size)
        pos_embed = torch.from_numpy(sincos_2d(hidden_size, self.grid_size)).float()[None]
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)
        self.t_embedder = OfficialTimestepEmbedder(hidden_size)
        if num_classes is not None:
            self.y_embedder = OfficialLabelEmbedder(num_classes + int(null_class), hidden_size)
        self.blocks = nn.ModuleList(
            [OfficialBlock(hidden_size, num_heads, self.grid_size, mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = OfficialFinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        n, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, c))
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y=None):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t)
        if y is not None:
            c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x))


def make_official(seed=0, **kwargs) -> OfficialDiffiT:
    """An official model with random weights everywhere (PyTorch default init plus random bias tables)."""
    torch.manual_seed(seed)
    model = OfficialDiffiT(**kwargs).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.normal_(std=0.5)
    return model


def random_inputs(official: OfficialDiffiT, batch_size=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    channels = official.x_embedder.proj.in_channels
    side = official.grid_size * official.patch_size
    latents = torch.randn(batch_size, channels, side, side, generator=generator)
    timesteps = torch.tensor([0.0, 999.0, *torch.rand(batch_size - 2, generator=generator).mul(1000).tolist()])
    labels = None
    if hasattr(official, "y_embedder"):
        rows = official.y_embedder.embedding_table.num_embeddings
        labels = torch.tensor([rows - 1, *torch.randint(0, rows - 1, (batch_size - 1,), generator=generator).tolist()])
    return latents, timesteps, labels


def assert_matches_official(model: DiffiTTransformer2DModel, official: OfficialDiffiT, seed=1):
    latents, timesteps, labels = random_inputs(official, seed=seed)
    with torch.no_grad():
        expected = official(latents, timesteps, labels)
        actual = model(latents, timesteps, labels).sample
    assert actual.shape == expected.shape
    assert expected.abs().max() > 0.1  # the final layer is not zero, so the comparison means something
    assert (actual - expected).abs().max().item() <= TOLERANCE


def official_state_dict(official: OfficialDiffiT) -> dict:
    return {key: value.contiguous() for key, value in official.state_dict().items()}


def save_safetensors(official: OfficialDiffiT, path: Path) -> Path:
    save_file(official_state_dict(official), str(path))
    return path


# 256px-shaped (grid 16) and 512px-shaped (grid 32) configs of tiny width.
SHAPES = {"256px": dict(input_size=32), "512px": dict(input_size=64)}


@pytest.mark.parametrize("shape", SHAPES)
def test_converted_safetensors_checkpoint_matches_official_forward(tmp_path, shape):
    official = make_official(**SHAPES[shape])
    model = convert_checkpoint(save_safetensors(official, tmp_path / "diffit.safetensors"), tmp_path / "out")
    assert not model.training
    assert_matches_official(model, official)


def test_sincos_transcription_agrees_with_the_models_position_embedding():
    # Both follow DiT: meshgrid(w, h) ordering, first half of the channels from the column coordinate.
    model = DiffiTTransformer2DModel(
        sample_size=12, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8, num_classes=None
    )
    expected = torch.from_numpy(sincos_2d(16, 6)).float()[None]
    assert torch.allclose(model.pos_embed.pos_embed, expected, atol=1e-6)
    # The grid is not symmetric in its channels: swapping the coordinates would change it.
    assert not torch.allclose(expected.view(6, 6, 16).transpose(0, 1).reshape(1, 36, 16), expected, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_inferred_config_is_complete_and_correct(shape):
    official = make_official(**SHAPES[shape])
    config = infer_config(official_state_dict(official))
    init_args = set(inspect.signature(DiffiTTransformer2DModel.__init__).parameters) - {"self"}
    assert set(config) == init_args
    assert config == {
        "sample_size": SHAPES[shape]["input_size"],
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": None,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "mlp_ratio": 4.0,
        "num_classes": 10,
        "class_dropout_prob": 0.1,
        "learn_sigma": True,
        "time_proj_dim": 256,
        "activation_fn": "gelu-approximate",
        "norm_eps": 1e-6,
        "dropout": 0.0,
        # ADM/DiT's training parameterization, which the saved DDPM scheduler speaks natively.
        "parameterization": "vp",
        "prediction_type": "epsilon",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "sigma_data": 0.5,
    }


def test_inferred_config_of_other_layouts():
    official = make_official(
        input_size=24, patch_size=4, in_channels=3, hidden_size=48, depth=3, num_heads=3, mlp_ratio=2.0,
        num_classes=None, learn_sigma=False,
    )
    config = infer_config(official_state_dict(official))
    assert (config["sample_size"], config["patch_size"], config["in_channels"]) == (24, 4, 3)
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (3, 3, 16)
    assert (config["mlp_ratio"], config["num_classes"], config["learn_sigma"]) == (2.0, None, False)
    assert config["class_dropout_prob"] == 0.0


def test_unknown_missing_and_misshapen_keys_are_all_listed():
    state_dict = official_state_dict(make_official())
    del state_dict["blocks.1.mlp.fc2.bias"], state_dict["blocks.0.attn.proj.weight"]
    state_dict["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    state_dict["extra_head.weight"] = torch.ones(3)
    state_dict["blocks.1.attn.qkv_temb.weight"] = torch.zeros(96, 31)
    with pytest.raises(CheckpointConversionError) as error:
        convert_state_dict(state_dict)
    message = str(error.value)
    listed = ("blocks.1.mlp.fc2.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.q_norm.weight", "extra_head.weight")
    for key in listed:
        assert key in message
    assert "unknown keys (2)" in message and "missing keys (2)" in message
    assert "blocks.1.attn.qkv_temb.weight: (96, 31), expected (96, 32)" in message


def test_keys_the_config_is_read_from_are_required():
    state_dict = official_state_dict(make_official())
    del state_dict["x_embedder.proj.weight"], state_dict["final_layer.linear.weight"]
    with pytest.raises(CheckpointConversionError, match="x_embedder.proj.weight, final_layer.linear.weight"):
        infer_config(state_dict)


def test_recomputed_buffers_are_verified_then_dropped():
    state_dict = official_state_dict(make_official())
    config, converted = convert_state_dict(state_dict)
    assert not any("pos_embed.pos_embed" in key or "relative_position_index" in key for key in converted)
    assert set(converted) == set(DiffiTTransformer2DModel.from_config(config).state_dict())

    shifted = dict(state_dict, pos_embed=state_dict["pos_embed"] + 1e-3)
    with pytest.raises(CheckpointConversionError, match="pos_embed"):
        convert_state_dict(shifted)
    transposed = dict(state_dict)
    transposed["blocks.1.attn.relative_position_index"] = state_dict["blocks.1.attn.relative_position_index"].T
    with pytest.raises(CheckpointConversionError, match="blocks.1.attn.relative_position_index"):
        convert_state_dict(transposed)
    wrong_grid = dict(state_dict, pos_embed=torch.zeros(1, 64, 32))
    with pytest.raises(CheckpointConversionError, match=r"expected \(1, 256, 32\)"):
        infer_config(wrong_grid)


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pt"])
def test_corrupt_file_error_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x07 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointConversionError, match=f"Could not read checkpoint .*{name}"):
        convert_checkpoint(path, tmp_path / "out")


def test_unusable_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        convert_checkpoint(tmp_path / "missing.safetensors", tmp_path / "out")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointConversionError, match="extension"):
        convert_checkpoint(tmp_path / "weights.npz", tmp_path / "out")
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 3}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointConversionError, match="top-level keys: 'optimizer', 'epoch'"):
        convert_checkpoint(tmp_path / "opt.pt", tmp_path / "out")


def test_cli_converts_casts_and_round_trips_through_from_pretrained(tmp_path, capsys):
    official = make_official()
    checkpoint = save_safetensors(official, tmp_path / "diffit_256.safetensors")
    output_dir = tmp_path / "converted"
    assert main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), "--transformer_only"]) == 0
    assert "depth 2, width 32" in capsys.readouterr().out
    weights = load_file(output_dir / "diffusion_pytorch_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    reloaded = DiffiTTransformer2DModel.from_pretrained(output_dir)
    assert_matches_official(reloaded, official)

    half_dir = tmp_path / "converted-bf16"
    assert main(
        ["--checkpoint", str(checkpoint), "--output_dir", str(half_dir), "--dtype", "bfloat16", "--transformer_only"]
    ) == 0
    weights = load_file(half_dir / "diffusion_pytorch_model.safetensors")
    assert all(tensor.dtype == torch.bfloat16 for tensor in weights.values())


def test_cli_user_errors_exit_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.safetensors", "--output_dir", str(tmp_path), "--dtype", "float64"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path)])
    assert "--checkpoint" in capsys.readouterr().err

    assert main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "nope.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_end_to_end_and_reload_gives_identical_outputs(tmp_path):
    official = make_official()
    checkpoint = save_safetensors(official, tmp_path / "diffit_256.safetensors")
    output_dir = tmp_path / "converted"
    result = subprocess.run(
        [
            sys.executable, "-m", "diffit_diffusers.convert_nvlabs",
            "--checkpoint", str(checkpoint), "--output_dir", str(output_dir), "--vae", str(save_tiny_vae(tmp_path)),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    in_process = convert_checkpoint(checkpoint, tmp_path / "in-process")
    reloaded = DiffiTTransformer2DModel.from_pretrained(output_dir / "denoiser")
    latents, timesteps, labels = random_inputs(official)
    with torch.no_grad():
        assert torch.equal(reloaded(latents, timesteps, labels).sample, in_process(latents, timesteps, labels).sample)


def save_tiny_vae(tmp_path: Path, latent_channels: int = 4) -> Path:
    """A tiny random AutoencoderKL folder standing in for stabilityai/sd-vae-ft-ema (2 levels: 8x downscale -> 2x)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
    )
    folder = tmp_path / f"vae-{latent_channels}"
    vae.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "shape, recipe",
    [
        ("256px", {"default_guidance_scale": 4.4, "default_guidance_schedule": "power_cosine"}),
        ("512px", {"default_guidance_scale": 1.49, "default_guidance_schedule": "constant"}),
    ],
)
def test_full_pipeline_folder_with_official_recipe(tmp_path, shape, recipe):
    official = make_official(**SHAPES[shape])
    checkpoint = save_safetensors(official, tmp_path / "diffit.safetensors")
    output_dir = tmp_path / "pipeline"
    assert main(["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), "--vae", str(save_tiny_vae(tmp_path))]) == 0

    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["default_num_inference_steps"] == 250 and index["default_guided_channels"] == 3
    assert {k: index[k] for k in recipe} == recipe
    scheduler = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["variance_type"], scheduler["beta_schedule"]) == (
        "DDPMScheduler", "learned_range", "linear",
    )
    card = (output_dir / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "cc-by-nc-sa-4.0" and metadata["base_model"] == "nvidia/DiffiT"
    assert "CC-BY-NC-SA-4.0" in card

    pipe = DiffiTPipeline.from_pretrained(output_dir)
    assert_matches_official(pipe.denoiser, official)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    size = SHAPES[shape]["input_size"] * 2
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()


def test_imagenet_label_names_ship_with_the_package():
    labels = imagenet_id2label()
    assert len(labels) == 1000
    assert labels[207] == "golden retriever" and labels[0].startswith("tench")


def test_pipeline_conversion_checks_the_vae(tmp_path):
    checkpoint = save_safetensors(make_official(), tmp_path / "diffit.safetensors")
    with pytest.raises(CheckpointConversionError, match="8 latent channels but the transformer expects 4"):
        convert_to_pipeline(checkpoint, tmp_path / "out", vae=save_tiny_vae(tmp_path, latent_channels=8))
    with pytest.raises(CheckpointConversionError, match="(?s)Could not load the VAE.*--vae"):
        convert_to_pipeline(checkpoint, tmp_path / "out", vae=tmp_path / "no-such-vae")
