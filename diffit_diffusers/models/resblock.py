"""The image-space DiffiT ResBlock (paper Section 3.2, Eq. 9-10).

    h = Conv3x3(SiLU(GroupNorm(x)))                                                        (Eq. 9)
    x = DiffiTBlock(h, x_t) + x                                                            (Eq. 10)

``DiffiTBlock`` is ``DiffiTTransformerBlock`` (Eq. 7-8) with
*windowed* TMSA, run on the feature map flattened to ``H*W`` tokens. The outer residual goes through a shortcut
convolution when the block changes the channel count (this project's decision: ``Conv1x1``).
"""

from __future__ import annotations

import torch
from torch import nn

from .recompute import ActivationRecomputation, BackwardRecomputation, recomputation_applies
from .transformer_block import DiffiTTransformerBlock


class DiffiTResBlock(nn.Module, ActivationRecomputation):
    """Convolution followed by a windowed DiffiT Transformer block, with an outer residual connection.

    While training, ``SiLU(GroupNorm(x))`` is recomputed in backward rather than kept (see
    :mod:`diffit_diffusers.models.recompute`).

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of the output feature map (the Transformer block's token width).
        time_embed_dim: width ``D_t`` of the time token.
        num_attention_heads: TMSA heads.
        window_size: side of the square TMSA windows. Feature maps that are not a whole number of windows are
            padded inside the attention (padded keys are masked out) and cropped back.
        mlp_ratio: Transformer MLP hidden width as a multiple of ``out_channels``.
        activation_fn: MLP activation (a diffusers ``FeedForward`` name).
        norm_num_groups: groups of the ``GroupNorm`` on the input; must divide ``in_channels``.
        norm_eps: epsilon of the ``GroupNorm`` and of the Transformer block's LayerNorms.
        norm_elementwise_affine: whether the Transformer block's LayerNorms have a learned scale and shift.
        dropout: dropout inside the Transformer MLP.
        shortcut_kernel_size: kernel side (1 or 3) of the shortcut convolution used when ``in_channels !=
            out_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        num_attention_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        activation_fn: str = "gelu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        norm_elementwise_affine: bool = True,
        dropout: float = 0.0,
        shortcut_kernel_size: int = 1,
    ):
        super().__init__()
        if in_channels % norm_num_groups:
            raise ValueError(
                f"`norm_num_groups` ({norm_num_groups}) must divide the block's input channels ({in_channels})."
            )
        if shortcut_kernel_size not in (1, 3):
            raise ValueError(f"`shortcut_kernel_size` must be 1 or 3, got {shortcut_kernel_size}.")
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.transformer = DiffiTTransformerBlock(
            out_channels,
            num_attention_heads,
            time_embed_dim=time_embed_dim,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            activation_fn=activation_fn,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            dropout=dropout,
            pad_to_window=True,
        )
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=shortcut_kernel_size, padding=shortcut_kernel_size // 2)
            if in_channels != out_channels
            else None
        )

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` ``(B, C_in, H, W)``, ``time_token`` ``(B, D_t)`` -> ``(B, C_out, H, W)``.

        Any memory format works; with channels-last maps (as the U-Net passes them) the switches between the map and
        its ``(B, H*W, C)`` tokens are views, so the Transformer block gets contiguous tokens without a copy.
        """
        height, width = hidden_states.shape[-2:]
        residual = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        features = self.conv_features(hidden_states)  # Eq. 9
        tokens = features.flatten(2).transpose(1, 2)  # (B, H*W, C_out)
        tokens = self.transformer(tokens, time_token, height, width)
        return tokens.transpose(1, 2).unflatten(2, (height, width)) + residual  # Eq. 10

    def conv_features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Eq. 9, ``h = Conv3x3(SiLU(GroupNorm(x)))``: ``(B, C_in, H, W) -> (B, C_out, H, W)``; the GroupNorm and SiLU
        outputs are recomputed in backward while training."""
        if not recomputation_applies(self.recompute_activations):
            return self.conv(self.act(self.norm(hidden_states)))
        with BackwardRecomputation() as saved:
            return self.conv(saved.recompute(self.act, saved.group_norm(self.norm, hidden_states)))
