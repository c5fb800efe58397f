"""Image-space DiffiT: a U-Net of convolutions and windowed DiffiT Transformer blocks (paper Section 3.2, Fig. 4).

Where each part of the paper lives:

- TMSA, Eq. 3-6: ``TimeDependentSelfAttention``.
- DiffiT Transformer block, Eq. 7-8: ``DiffiTTransformerBlock``.
- DiffiT ResBlock, Eq. 9-10: ``DiffiTResBlock``.
- Time token (sinusoid -> SiLU MLP, plus optional label embedding):
  ``DiffiTTimeEmbedding``.
- Down/upsampling ("convolutional" in the paper): diffusers' ``Downsample2D`` (stride-2 ``Conv3x3``) and
  ``Upsample2D`` (nearest x2, then ``Conv3x3``).
- The U-shaped encoder/bottleneck/decoder with skip connections: ``DiffiTUNet2DModel`` below.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.downsampling import Downsample2D
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..presets import PresetMixin
from .attention import DiffiTAttentionMixin
from .cache_support import CacheLayout, DiffiTCacheMixin
from .config_validation import validate_config
from .denoiser import DenoiserParameterization, DiffiTDenoiserMixin, register_denoiser
from .embeddings import PRECISION_SENSITIVE_MODULES, DiffiTTimeEmbedding, broadcast_timestep
from .linear import OneDNNLinearMixin
from .recompute import ActivationRecomputationMixin
from .resblock import DiffiTResBlock


SKIP_CONNECTION_TYPES = ("concat", "add")
DOWNSAMPLE_TYPES = ("conv", "avg_pool")
UPSAMPLE_TYPES = ("conv", "nearest")


class DiffiTResBlockStack(nn.Module):
    """Base of the U-Net stages: runs its ResBlocks with optional gradient checkpointing."""

    def __init__(self, resnets: list[DiffiTResBlock]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.gradient_checkpointing = False

    def apply_resblock(
        self, resnet: DiffiTResBlock, hidden_states: torch.Tensor, time_token: torch.Tensor
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(resnet, hidden_states, time_token)
        return resnet(hidden_states, time_token)


class DiffiTDownBlock2D(DiffiTResBlockStack):
    """One encoder stage: ResBlocks at one resolution, then an optional ``Downsample2D``.

    Every ResBlock output and the downsampled map are returned as skip connections.
    """

    def __init__(self, resnets: list[DiffiTResBlock], downsampler: Downsample2D | None):
        super().__init__(resnets)
        self.downsampler = downsampler

    def forward(
        self, hidden_states: torch.Tensor, time_token: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(B, C_in, H, W)`` -> ``(B, C, H', W')`` and the skips, in the order they were made."""
        skips = ()
        for resnet in self.resnets:
            hidden_states = self.apply_resblock(resnet, hidden_states, time_token)
            skips += (hidden_states,)
        if self.downsampler is not None:
            hidden_states = self.downsampler(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class DiffiTMidBlock2D(DiffiTResBlockStack):
    """The bottleneck: ResBlocks at the lowest resolution, where windowed attention mixes the most context."""

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = self.apply_resblock(resnet, hidden_states, time_token)
        return hidden_states


class SkipMerge(nn.Module):
    """Merge a decoder feature map with an encoder skip: concatenate, or add (through a ``Conv1x1`` if widths differ).

    Args:
        channels: channels of the decoder feature map.
        skip_channels: channels of the skip.
        skip_connection_type: ``"concat"`` or ``"add"``.
    """

    def __init__(self, channels: int, skip_channels: int, skip_connection_type: str):
        super().__init__()
        self.concat = skip_connection_type == "concat"
        self.out_channels = channels + skip_channels if self.concat else channels
        needs_projection = not self.concat and skip_channels != channels
        self.skip_proj = nn.Conv2d(skip_channels, channels, kernel_size=1) if needs_projection else None

    def forward(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.concat:
            return torch.cat([hidden_states, skip], dim=1)
        return hidden_states + (skip if self.skip_proj is None else self.skip_proj(skip))


class DiffiTUpBlock2D(DiffiTResBlockStack):
    """One decoder stage: ResBlocks that each take one encoder skip, then an optional ``Upsample2D``."""

    def __init__(self, resnets: list[DiffiTResBlock], skip_merges: list[SkipMerge], upsampler: Upsample2D | None):
        super().__init__(resnets)
        self.skip_merges = nn.ModuleList(skip_merges)
        self.upsampler = upsampler

    def forward(
        self, hidden_states: torch.Tensor, skips: tuple[torch.Tensor, ...], time_token: torch.Tensor
    ) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C, H', W')``; ``skips`` holds one skip per ResBlock, the last one first used.

        The skips come as this block's own tuple rather than a shared list to pop from, so hooks that copy the
        arguments (group offloading, device placement) see the same skips as the block.
        """
        for resnet, skip_merge, skip in zip(self.resnets, self.skip_merges, reversed(skips)):
            hidden_states = skip_merge(hidden_states, skip)
            hidden_states = self.apply_resblock(resnet, hidden_states, time_token)
        if self.upsampler is not None:
            hidden_states = self.upsampler(hidden_states)
        return hidden_states


def _channels_last_copy(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` ``images`` laid out channels-last.

    Unlike ``.contiguous(memory_format=torch.channels_last)``, this also gives single-channel images channels-last
    strides (their NCHW strides count as channels-last too, but convolutions would then keep NCHW).
    """
    return torch.empty_like(images, memory_format=torch.channels_last).copy_(images)


def _per_stage(value: int | list[int] | tuple[int, ...], name: str, num_stages: int) -> list[int]:
    values = [value] * num_stages if isinstance(value, int) else list(value)
    if len(values) != num_stages or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"`{name}` must be a positive integer or a list of {num_stages} positive integers (one per entry of "
            f"`block_out_channels`), got {value!r}."
        )
    return values


@register_denoiser
class DiffiTUNet2DModel(
    DiffiTDenoiserMixin,
    DiffiTAttentionMixin,
    DiffiTCacheMixin,
    ActivationRecomputationMixin,
    OneDNNLinearMixin,
    PresetMixin,
    ModelMixin,
    ConfigMixin,
    PeftAdapterMixin,
):
    """The image-space DiffiT denoiser (CIFAR-10 FID 1.95, FFHQ-64 2.22): a U-Net built from DiffiT ResBlocks.

    ``Conv3x3`` stem ``->`` encoder stages of ``layers_per_block`` ResBlocks (``DiffiTResBlock``) separated by
    downsampling ``->`` bottleneck of ``mid_block_layers`` ResBlocks at the lowest resolution (two by default)
    ``->`` decoder stages of ``layers_per_block + 1`` ResBlocks, each merging one encoder skip, separated by
    upsampling ``->`` ``GroupNorm -> SiLU -> Conv3x3`` head. The skip layout follows diffusers' ``UNet2DModel``:
    the encoder keeps the stem output, every ResBlock output and every downsampled map. The time token (sinusoid
    ``->`` SiLU MLP, plus a label embedding for class-conditional models) is shared by every TMSA layer; there is
    no other time conditioning. The output convolution starts at zero.

    Any ``H, W`` divisible by ``2^(len(block_out_channels) - 1)`` works: feature maps that are not a whole number of
    attention windows are padded inside the attention and cropped back.

    Parameters:
        sample_size: side of the images the model is meant for (informational; other sizes work, see above).
        in_channels: channels of the input image.
        out_channels: channels of the prediction (defaults to ``in_channels``). With ``learn_sigma`` the model
            outputs ``2 * out_channels`` channels: the prediction, then the variance interpolation values.
        block_out_channels: width of each stage, highest resolution first; the resolution halves per stage.
        layers_per_block: encoder ResBlocks per stage (an int, or one per stage). Decoder stages have one more.
        window_size: side of the TMSA windows (an int, or one per stage).
        attention_head_dim: channels per TMSA head; heads per block = stage width / ``attention_head_dim``.
        mlp_ratio: Transformer MLP hidden width as a multiple of the stage width.
        activation_fn: Transformer MLP activation (diffusers ``FeedForward`` name). Exact ``"gelu"`` (the paper's
            GELU); the latent model defaults to the tanh approximation its released checkpoints use.
        norm_num_groups: groups of every ``GroupNorm``.
        norm_eps: epsilon of the GroupNorms and LayerNorms. ``1e-5`` (PyTorch's and diffusers' ``UNet2DModel``
            default); the latent model defaults to the ``1e-6`` of its released checkpoints.
        norm_elementwise_affine: whether the Transformer blocks' LayerNorms have a learned scale and shift.
        time_embed_dim: width ``D_t`` of the time token.
        time_proj_dim: width of the sinusoidal timestep features (default: ``block_out_channels[0]``).
        num_classes: number of classes for class conditioning, ``None`` for an unconditional model.
        class_dropout_prob: label dropout while training; ``> 0`` adds the null class (id ``num_classes``) for
            classifier-free guidance.
        dropout: dropout inside the Transformer MLPs.
        mid_block_layers: ResBlocks in the bottleneck.
        skip_connection_type: ``"concat"`` (default) or ``"add"`` (through a ``Conv1x1`` where widths differ).
        shortcut_kernel_size: kernel side (1 or 3) of a ResBlock's shortcut convolution where it changes width.
        downsample_type: ``"conv"`` (stride-2 ``Conv3x3``, default) or ``"avg_pool"``.
        upsample_type: ``"conv"`` (nearest x2 then ``Conv3x3``, default) or ``"nearest"``.
        learn_sigma: also predict the ADM variance interpolation (doubles the output channels; ``"vp"`` only).
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
    _no_split_modules = ["DiffiTResBlock"]
    _cache_layout = CacheLayout(
        attention_pattern=r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.resnets\.\d+\.transformer\.attn$",
        block_stack=None,
        sample_argument="sample",
    )
    _repeated_blocks = ["DiffiTTransformerBlock"]
    #: Never stored in low precision by layerwise casting. No ``_keep_in_fp32_modules``: in diffusers it would forbid
    #: ``from_pretrained(low_cpu_mem_usage=False)``.
    _skip_layerwise_casting_patterns = ["conv_in", "norm", "conv_out", *PRECISION_SENSITIVE_MODULES]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 256),
        layers_per_block: int | tuple[int, ...] = 2,
        window_size: int | tuple[int, ...] = 4,
        attention_head_dim: int = 32,
        mlp_ratio: float = 4.0,
        activation_fn: str = "gelu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        norm_elementwise_affine: bool = True,
        time_embed_dim: int = 512,
        time_proj_dim: int | None = None,
        num_classes: int | None = None,
        class_dropout_prob: float = 0.1,
        dropout: float = 0.0,
        mid_block_layers: int = 2,
        skip_connection_type: str = "concat",
        shortcut_kernel_size: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        learn_sigma: bool = False,
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
                in_channels=in_channels,
                out_channels=out_channels,
                block_out_channels=block_out_channels,
                layers_per_block=layers_per_block,
                window_size=window_size,
                attention_head_dim=attention_head_dim,
                mlp_ratio=mlp_ratio,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                time_embed_dim=time_embed_dim,
                time_proj_dim=time_proj_dim,
            ),
            activation_fn=activation_fn,
        )
        DenoiserParameterization(
            parameterization, prediction_type, num_train_timesteps, beta_schedule, beta_start, beta_end, sigma_data,
            learn_sigma,
        )
        num_stages = len(block_out_channels)
        if num_stages < 1:
            raise ValueError("`block_out_channels` must list at least one stage width.")
        bad_widths = [c for c in block_out_channels if c % attention_head_dim or c % norm_num_groups]
        if bad_widths:
            raise ValueError(
                f"Every entry of `block_out_channels` must be divisible by `attention_head_dim` "
                f"({attention_head_dim}) and by `norm_num_groups` ({norm_num_groups}); {bad_widths} are not."
            )
        layers = _per_stage(layers_per_block, "layers_per_block", num_stages)
        windows = _per_stage(window_size, "window_size", num_stages)
        for name, value, allowed in (
            ("skip_connection_type", skip_connection_type, SKIP_CONNECTION_TYPES),
            ("downsample_type", downsample_type, DOWNSAMPLE_TYPES),
            ("upsample_type", upsample_type, UPSAMPLE_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if mid_block_layers < 0:
            raise ValueError(f"`mid_block_layers` must be >= 0, got {mid_block_layers}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer or None, got {num_classes}.")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in [0, 1), got {class_dropout_prob}.")
        self.downsample_factor = 2 ** (num_stages - 1)
        self.gradient_checkpointing = False

        def resblock(in_ch: int, out_ch: int, window: int) -> DiffiTResBlock:
            return DiffiTResBlock(
                in_ch,
                out_ch,
                time_embed_dim=time_embed_dim,
                num_attention_heads=out_ch // attention_head_dim,
                window_size=window,
                mlp_ratio=mlp_ratio,
                activation_fn=activation_fn,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
                norm_elementwise_affine=norm_elementwise_affine,
                dropout=dropout,
                shortcut_kernel_size=shortcut_kernel_size,
            )

        self.time_embedding = DiffiTTimeEmbedding(
            time_proj_dim or block_out_channels[0], time_embed_dim, num_classes, class_dropout_prob
        )
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        channels = block_out_channels[0]
        skip_channels = [channels]
        self.down_blocks = nn.ModuleList()
        for stage, width in enumerate(block_out_channels):
            is_lowest = stage == num_stages - 1
            resnets = [resblock(channels if i == 0 else width, width, windows[stage]) for i in range(layers[stage])]
            # name="op" keeps the convolution once, as `conv` (diffusers' default name also aliases it `Conv2d_0`).
            downsampler = (
                None if is_lowest else Downsample2D(width, use_conv=downsample_type == "conv", padding=1, name="op")
            )
            self.down_blocks.append(DiffiTDownBlock2D(resnets, downsampler))
            channels = width
            skip_channels += [width] * (layers[stage] + (0 if is_lowest else 1))

        self.mid_block = DiffiTMidBlock2D([resblock(channels, channels, windows[-1]) for _ in range(mid_block_layers)])

        self.up_blocks = nn.ModuleList()
        for stage in reversed(range(num_stages)):
            width = block_out_channels[stage]
            resnets, skip_merges = [], []
            for _ in range(layers[stage] + 1):
                skip_merges.append(SkipMerge(channels, skip_channels.pop(), skip_connection_type))
                resnets.append(resblock(skip_merges[-1].out_channels, width, windows[stage]))
                channels = width
            upsampler = Upsample2D(width, use_conv=upsample_type == "conv") if stage > 0 else None
            self.up_blocks.append(DiffiTUpBlock2D(resnets, skip_merges, upsampler))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.conv_out = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _check_sample(self, sample: torch.Tensor) -> None:
        channels, factor = self.config.in_channels, self.downsample_factor
        if sample.ndim != 4 or sample.shape[1] != channels:
            raise ValueError(
                f"Expected `sample` of shape (batch, {channels}, height, width) (in_channels={channels}), received "
                f"{tuple(sample.shape)}."
            )
        height, width = sample.shape[-2:]
        if height % factor or width % factor or height == 0 or width == 0:
            stages = len(self.config.block_out_channels)
            raise ValueError(
                f"Height and width must be positive multiples of {factor} (2^(stages - 1) for a {stages}-stage "
                f"U-Net), e.g. {factor}, {2 * factor}, {3 * factor}, ...; received {height}x{width}. Pad or resize "
                f"the input."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict, in the model's ``parameterization``, for a batch of noisy images (and the variance values).

        Args:
            sample: noisy images ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of ``2^(stages - 1)``.
            timestep: a number, a 0-d tensor or a ``(B,)`` tensor: the training-scale timestep (``"vp"``) or
                ``c_noise = ln(sigma) / 4`` (``"edm"``).
            class_labels: ``(B,)`` integer labels for a class-conditional model (``null_class_id`` = unconditional).
            return_dict: return a ``UNet2DOutput`` rather than a tuple.

        Returns:
            ``sample`` of shape ``(B, out_channels * (2 if learn_sigma else 1), H, W)``.
        """
        self._check_sample(sample)
        batch_size = sample.shape[0]
        self.time_embedding.check_class_labels(class_labels, batch_size)
        timestep = broadcast_timestep(timestep, batch_size, sample.device)
        time_token = self.time_embedding(timestep, class_labels, dtype=sample.dtype)

        # Channels-last feature maps make every ResBlock's (B, C, H, W) <-> (B, H*W, C) token view a free reshape;
        # convolutions, norms, resampling and concatenation keep the format from the input on.
        hidden_states = self.conv_in(_channels_last_copy(sample))
        skips = (hidden_states,)
        for down_block in self.down_blocks:
            hidden_states, block_skips = down_block(hidden_states, time_token)
            skips += block_skips
        hidden_states = self.mid_block(hidden_states, time_token)
        for up_block in self.up_blocks:
            num_skips = len(up_block.resnets)
            hidden_states = up_block(hidden_states, skips[-num_skips:], time_token)
            skips = skips[:-num_skips]
        output = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states))).contiguous()

        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)
