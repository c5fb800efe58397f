"""Latent DiffiT: a ViT denoiser whose blocks use time-dependent self-attention (paper Section 3.2, App. H.2)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..loaders.single_file import FromOriginalDiffiTMixin
from ..presets import PresetMixin
from .attention import DiffiTAttentionMixin
from .cache_support import CacheLayout, DiffiTCacheMixin
from .config_validation import validate_config
from .denoiser import DenoiserParameterization, DiffiTDenoiserMixin, register_denoiser
from .embeddings import PRECISION_SENSITIVE_MODULES, DiffiTTimeEmbedding, broadcast_timestep
from .linear import OneDNNLinear, OneDNNLinearMixin
from .recompute import ActivationRecomputationMixin
from .transformer_block import DiffiTTransformerBlock


@register_denoiser
class DiffiTTransformer2DModel(
    DiffiTDenoiserMixin,
    DiffiTAttentionMixin,
    DiffiTCacheMixin,
    ActivationRecomputationMixin,
    OneDNNLinearMixin,
    PresetMixin,
    ModelMixin,
    ConfigMixin,
    PeftAdapterMixin,
    FromOriginalDiffiTMixin,
):
    r"""The latent DiffiT denoiser (DiffiT-XL/2: 561M parameters, ImageNet-256 FID 1.73).

    Patchify ``->`` fixed 2D sin-cos positions ``->`` ``num_layers`` DiffiT blocks with *global* TMSA whose time
    token is ``c = MLP(sinusoid(t)) + y_embed(y)`` ``->`` ``Linear(SiLU(LayerNorm(x)))`` ``->`` unpatchify. There
    is no adaLN: the time token only enters through the attention projections.

    Training keeps every activation for backward by default (at 0.83x DiT's memory for DiffiT-S/2);
    ``enable_activation_recomputation()`` recomputes the MLP's LayerNorm and GELU outputs instead (0.61x DiT's,
    3-5% slower on a CPU).

    Parameters:
        sample_size: side of the (square) latent the model is trained on; the token grid is
            ``sample_size // patch_size`` and sets the attention window.
        patch_size: side of the square patches.
        in_channels: channels of the input latent.
        out_channels: channels of the prediction (defaults to ``in_channels``). With ``learn_sigma`` the model
            outputs ``2 * out_channels`` channels: the prediction, then the variance interpolation values.
        num_layers: number of DiffiT blocks.
        num_attention_heads: TMSA heads per block.
        attention_head_dim: channels per head; the hidden width is ``num_attention_heads * attention_head_dim``.
        mlp_ratio: MLP hidden width as a multiple of the hidden width.
        num_classes: number of classes for class conditioning, ``None`` for an unconditional model.
        class_dropout_prob: label dropout while training; ``> 0`` adds the null class (id ``num_classes``).
        learn_sigma: also predict the ADM variance interpolation (doubles the output channels; ``"vp"`` only).
            The DiffiT presets and converted NVIDIA checkpoints set it.
        time_proj_dim: width of the sinusoidal timestep features.
        activation_fn: MLP activation (diffusers ``FeedForward`` name). ``"gelu-approximate"`` (tanh GELU), not the
            U-Net's exact ``"gelu"``, because the released latent checkpoints (DiT's MLP) were trained with it.
        norm_eps: epsilon of the (non-affine) LayerNorms. ``1e-6``, not the U-Net's ``1e-5``, because the released
            latent checkpoints use DiT's LayerNorm epsilon.
        dropout: dropout inside the MLPs.
        parameterization: how the model was trained, ``"vp"`` (discrete variance-preserving) or ``"edm"``; see
            :mod:`diffit_diffusers.models.denoiser`. The pipeline converts any scheduler's convention to it; the
            defaults describe DDPM epsilon training on the linear schedule.
        prediction_type: ``"vp"`` target: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        num_train_timesteps: ``"vp"`` training timesteps ``T``.
        beta_schedule: ``"vp"`` beta schedule (a ``DDPMScheduler`` name).
        beta_start: first beta of the ``"vp"`` schedule.
        beta_end: last beta of the ``"vp"`` schedule.
        sigma_data: ``"edm"`` data standard deviation of the preconditioning.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffiTTransformerBlock"]
    _cache_layout = CacheLayout(
        attention_pattern=r"^transformer_blocks\.\d+\.attn$",
        block_stack="transformer_blocks",
        sample_argument="hidden_states",
    )
    _repeated_blocks = ["DiffiTTransformerBlock"]
    #: Never stored in low precision by layerwise casting. No ``_keep_in_fp32_modules``: in diffusers it would forbid
    #: ``from_pretrained(low_cpu_mem_usage=False)``.
    _skip_layerwise_casting_patterns = ["pos_embed", "norm", "proj_out", *PRECISION_SENSITIVE_MODULES]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        time_proj_dim: int = 256,
        activation_fn: str = "gelu-approximate",
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        parameterization: str = "vp",
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        validate_config(
            type(self).__name__,
            positive=dict(
                sample_size=sample_size,
                patch_size=patch_size,
                in_channels=in_channels,
                out_channels=out_channels,
                num_layers=num_layers,
                num_attention_heads=num_attention_heads,
                attention_head_dim=attention_head_dim,
                mlp_ratio=mlp_ratio,
                time_proj_dim=time_proj_dim,
                norm_eps=norm_eps,
            ),
            activation_fn=activation_fn,
            sincos_width=("num_attention_heads * attention_head_dim", num_attention_heads * attention_head_dim),
        )
        DenoiserParameterization(
            parameterization, prediction_type, num_train_timesteps, beta_schedule, beta_start, beta_end, sigma_data,
            learn_sigma,
        )
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` ({sample_size}) must be divisible by `patch_size` ({patch_size}).")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer or None, got {num_classes}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
        self.inner_dim = num_attention_heads * attention_head_dim
        self.grid_size = sample_size // patch_size
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.gradient_checkpointing = False

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
        )
        self.time_embedding = DiffiTTimeEmbedding(time_proj_dim, self.inner_dim, num_classes, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                DiffiTTransformerBlock(
                    self.inner_dim,
                    num_attention_heads,
                    time_embed_dim=self.inner_dim,
                    window_size=self.grid_size,
                    mlp_ratio=mlp_ratio,
                    activation_fn=activation_fn,
                    norm_elementwise_affine=False,
                    norm_eps=norm_eps,
                    dropout=dropout,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=norm_eps)
        self.act_out = nn.SiLU()
        self.proj_out = OneDNNLinear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()
        # Unlike the U-Net, which needs it to train in its peer's memory, this model trains below DiT's memory with
        # every activation kept, and recomputing them would cost it 3-5% of a CPU training step.
        self.disable_activation_recomputation()

    def initialize_weights(self) -> None:
        """The released model's initialisation: xavier-uniform linears with zero bias, N(0, 0.02) embeddings, zero
        output layer (the relative position bias tables keep their truncated-normal init)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        patch_proj = self.pos_embed.proj
        nn.init.xavier_uniform_(patch_proj.weight.view(patch_proj.weight.shape[0], -1))
        nn.init.zeros_(patch_proj.bias)
        timestep_embedder = self.time_embedding.timestep_embedder
        nn.init.normal_(timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(timestep_embedder.linear_2.weight, std=0.02)
        if self.time_embedding.class_embedder is not None:
            nn.init.normal_(self.time_embedding.class_embedder.embedding_table.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _check_inputs(self, hidden_states: torch.Tensor) -> None:
        expected = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        if hidden_states.ndim != 4 or tuple(hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"Expected `hidden_states` of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(in_channels, sample_size, sample_size), received {tuple(hidden_states.shape)}."
            )

    def unpatchify(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, (H/p)*(W/p), p*p*C_out)`` tokens -> ``(B, C_out, H, W)`` image."""
        p, grid = self.config.patch_size, self.grid_size
        hidden_states = hidden_states.view(-1, grid, grid, p, p, self.out_channels)
        hidden_states = hidden_states.permute(0, 5, 1, 3, 2, 4)
        return hidden_states.reshape(-1, self.out_channels, grid * p, grid * p)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict, in the model's ``parameterization``, for a batch of noisy latents (and the variance values).

        Args:
            hidden_states: noisy latents ``(B, in_channels, sample_size, sample_size)``.
            timestep: a number, a 0-d tensor or a ``(B,)`` tensor: the training-scale timestep (``"vp"``) or
                ``c_noise = ln(sigma) / 4`` (``"edm"``).
            class_labels: ``(B,)`` integer labels for a class-conditional model (``num_classes`` = null class).
            return_dict: return a ``Transformer2DModelOutput`` rather than a tuple.

        Returns:
            ``sample`` of shape ``(B, out_channels, sample_size, sample_size)``.
        """
        self._check_inputs(hidden_states)
        batch_size = hidden_states.shape[0]
        self.time_embedding.check_class_labels(class_labels, batch_size)
        timestep = broadcast_timestep(timestep, batch_size, hidden_states.device)
        time_token = self.time_embedding(timestep, class_labels, dtype=hidden_states.dtype)

        # The patch embedding returns channel-strided tokens; one copy here spares every LayerNorm below a copy.
        hidden_states = self.pos_embed(hidden_states).contiguous()
        grid = self.grid_size
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, time_token, grid, grid)
            else:
                hidden_states = block(hidden_states, time_token, grid, grid)

        hidden_states = self.proj_out(self.act_out(self.norm_out(hidden_states)))
        output = self.unpatchify(hidden_states)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
