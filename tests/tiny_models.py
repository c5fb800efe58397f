"""Small DiffiT models with non-zero weights everywhere (so every layer changes the output), for feature tests."""

import torch

from diffit_diffusers import DiffiTTransformer2DModel, DiffiTUNet2DModel


def _randomised(model):
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


def tiny_unet() -> DiffiTUNet2DModel:
    """The ``tiny`` preset: 1-channel 16x16 images, 10 classes and a null class."""
    torch.manual_seed(0)
    return _randomised(DiffiTUNet2DModel.from_preset("tiny"))


def tiny_transformer(num_layers: int = 2) -> DiffiTTransformer2DModel:
    """A latent transformer on 4x8x8 latents, 10 classes and a null class."""
    torch.manual_seed(0)
    return _randomised(
        DiffiTTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, num_attention_heads=2,
            attention_head_dim=16, num_classes=10,
        )
    )


def single_stage_unet() -> DiffiTUNet2DModel:
    """An unconditional one-stage U-Net whose Transformer blocks all share one shape (1-channel 8x8 images)."""
    torch.manual_seed(0)
    return _randomised(
        DiffiTUNet2DModel(
            block_out_channels=(32,), layers_per_block=1, mid_block_layers=1, in_channels=1, out_channels=1,
            norm_num_groups=8, time_embed_dim=64, window_size=4,
        )
    )
