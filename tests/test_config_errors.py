"""Bad model configurations fail with one clear ValueError naming the field and what is allowed."""

import pytest

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel


TINY_UNET = dict(
    sample_size=8, block_out_channels=(8, 16), layers_per_block=1, window_size=4, attention_head_dim=8,
    norm_num_groups=4, time_embed_dim=16,
)
TINY_TRANSFORMER = dict(sample_size=8, in_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(block_out_channels=(8, 0)), r"`block_out_channels` must be positive integers, got \(8, 0\)"),
        (dict(attention_head_dim=0), r"`attention_head_dim` must be a positive integer, got 0"),
        (dict(layers_per_block=-1), "`layers_per_block` must be a positive integer"),
        (dict(norm_num_groups=0), "`norm_num_groups`"),
        (dict(time_embed_dim=-16), "`time_embed_dim`"),
        (dict(mlp_ratio=0.0), "`mlp_ratio`"),
        (dict(activation_fn="relu6"), r"unknown `activation_fn` 'relu6'; use one of gelu, gelu-approximate"),
    ],
)
def test_bad_unet_config_raises(overrides, message):
    with pytest.raises(ValueError, match=f"DiffiTUNet2DModel: {message}"):
        DiffiTUNet2DModel(**{**TINY_UNET, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=0), "`num_attention_heads` must be a positive integer, got 0"),
        (dict(attention_head_dim=-8), "`attention_head_dim`"),
        (dict(patch_size=0), "`patch_size`"),
        (dict(num_layers=0), "`num_layers`"),
        (dict(activation_fn="gelu_new"), "unknown `activation_fn` 'gelu_new'"),
        (dict(attention_head_dim=9), r"the hidden width num_attention_heads \* attention_head_dim = 18 must be divisible by 4"),
    ],
)
def test_bad_transformer_config_raises(overrides, message):
    with pytest.raises(ValueError, match=f"DiffiTTransformer2DModel: {message}"):
        DiffiTTransformer2DModel(**{**TINY_TRANSFORMER, **overrides})


def test_loading_a_folder_of_the_other_model_class_names_the_right_class(tmp_path):
    DiffiTTransformer2DModel(**TINY_TRANSFORMER).save_pretrained(tmp_path / "transformer")
    DiffiTUNet2DModel(**TINY_UNET).save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="saved by DiffiTTransformer2DModel, not DiffiTUNet2DModel: load it with "
                       "DiffiTTransformer2DModel.from_pretrained"):
        DiffiTUNet2DModel.from_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="saved by DiffiTUNet2DModel, not DiffiTTransformer2DModel"):
        DiffiTTransformer2DModel.from_pretrained(tmp_path / "unet")
    assert DiffiTUNet2DModel.from_pretrained(tmp_path / "unet").config.block_out_channels == [8, 16]


def test_from_preset_rejects_unknown_keyword_arguments():
    with pytest.raises(ValueError, match=r"from_preset got unknown config field\(s\) \['num_head'\]; allowed fields: "
                       r"\[.*'num_attention_heads'"):
        DiffiTTransformer2DModel.from_preset("DiffiT-XL/2", num_head=4)
    assert DiffiTUNet2DModel.from_preset("tiny", num_classes=None).config.num_classes is None
