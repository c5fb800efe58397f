"""The DiffiT Transformer block (paper Eq. 7-8), shared by the latent and the image-space models."""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import nn

from .attention import TimeDependentSelfAttention
from .linear import use_onednn_linears
from .recompute import ActivationRecomputation, BackwardRecomputation, recomputation_applies


class DiffiTTransformerBlock(nn.Module, ActivationRecomputation):
    """Pre-norm Transformer block with time-dependent self-attention.

    ``x = x + TMSA(LN(x), x_t)`` (Eq. 7); ``x = x + MLP(LN(x))`` (Eq. 8).

    While training, the MLP's ``LN(x)`` and ``GELU(h)`` are recomputed in backward rather than kept (see
    :mod:`diffit_diffusers.models.recompute`).

    Args:
        dim: token width ``C``.
        num_attention_heads: TMSA heads.
        time_embed_dim: width of the time token.
        window_size: TMSA window side (the grid side for global attention).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        activation_fn: a diffusers ``FeedForward`` activation (``"gelu-approximate"`` is tanh-GELU).
        norm_elementwise_affine: whether the LayerNorms have a learned scale and shift.
        norm_eps: LayerNorm epsilon.
        dropout: dropout inside the MLP.
        pad_to_window: let TMSA pad grids that are not a whole number of windows.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        time_embed_dim: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        activation_fn: str = "gelu-approximate",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        pad_to_window: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.attn = TimeDependentSelfAttention(
            dim, time_embed_dim, num_attention_heads, window_size, pad_to_window=pad_to_window
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=norm_elementwise_affine, eps=norm_eps)
        self.ff = use_onednn_linears(FeedForward(dim, mult=mlp_ratio, dropout=dropout, activation_fn=activation_fn))

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``hidden_states`` ``(B, H*W, C)``, ``time_token`` ``(B, D_t)`` -> ``(B, H*W, C)``."""
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), time_token, height, width)
        return hidden_states + self.feed_forward(hidden_states)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``MLP(LN(x))`` of Eq. 8, ``(B, N, C) -> (B, N, C)``. For GELU MLPs (both models' activations) ``LN(x)`` and
        ``GELU(h)`` are recomputed in backward while training."""
        projection_in = self.ff.net[0]
        if not (recomputation_applies(self.recompute_activations) and isinstance(projection_in, GELU)):
            return self.ff(self.norm2(hidden_states))
        with BackwardRecomputation() as saved:
            hidden = projection_in.proj(saved.recompute(self.norm2, hidden_states))
            hidden = saved.recompute(projection_in.gelu, hidden)
            for module in self.ff.net[1:]:
                hidden = module(hidden)
        return hidden
