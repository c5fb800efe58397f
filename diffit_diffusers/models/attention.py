"""Time-dependent multi-head self-attention (TMSA), DiffiT paper Section 3.2, Eq. 3-6.

Queries, keys and values are linear functions of the spatial tokens *and* of the time token:

    q = x_s W_qs + x_t W_qt,    k = x_s W_ks + x_t W_kt,    v = x_s W_vs + x_t W_vt        (Eq. 3-5)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V                                  (Eq. 6)

where ``B`` is a learned Swin-style relative position bias. Attention runs inside non-overlapping
``window_size x window_size`` windows; a window as large as the token grid gives global attention.

The module follows diffusers' attention interface: ``TimeDependentSelfAttention`` is an
``AttentionModuleMixin`` whose processor calls ``dispatch_attention_fn``, so ``set_attention_backend``,
``set_attn_processor`` and ``attn_processors`` work on every model built from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)
from torch import nn


#: Attention backends that accept an additive float ``attn_mask``, which carries the relative position bias.
MASK_CAPABLE_BACKENDS: tuple[AttentionBackendName, ...] = (
    AttentionBackendName.NATIVE,
    AttentionBackendName._NATIVE_MATH,
    AttentionBackendName._NATIVE_EFFICIENT,
    AttentionBackendName._NATIVE_CUDNN,
)


def check_backend_takes_bias(backend: AttentionBackendName | str | None) -> None:
    """Raise a ``ValueError`` if ``backend`` cannot add DiffiT's relative position bias as an attention mask."""
    if backend is None:
        return
    name = backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(str(backend).lower())
    if name not in MASK_CAPABLE_BACKENDS:
        supported = ", ".join(repr(b.value) for b in MASK_CAPABLE_BACKENDS)
        raise ValueError(
            f"Attention backend {name.value!r} cannot take an additive attention mask, which DiffiT needs for its "
            f"relative position bias. Use one of: {supported}."
        )


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into a ``((2w-1)^2, heads)`` bias table for every pair of tokens in a ``w x w`` window.

    Tokens are numbered row-major. For tokens ``i`` and ``j`` with row/column offsets ``dh, dw`` the index is
    ``(dh + w - 1) * (2w - 1) + (dw + w - 1)``.

    Returns:
        ``LongTensor`` of shape ``(w^2, w^2)``.
    """
    rows, cols = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, w^2)
    offsets = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, w^2, w^2)
    return offsets[0] * (2 * window_size - 1) + offsets[1]


@dataclass(frozen=True)
class WindowLayout:
    """How a ``(B, H*W, C)`` token map was cut into windows, so the cut can be undone exactly."""

    batch_size: int
    height: int
    width: int
    padded_height: int
    padded_width: int
    window_size: int

    @property
    def windows_per_image(self) -> int:
        return (self.padded_height // self.window_size) * (self.padded_width // self.window_size)

    @property
    def is_padded(self) -> bool:
        return (self.padded_height, self.padded_width) != (self.height, self.width)


def window_partition(hidden_states: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Cut a token map into non-overlapping windows (zero padding on the bottom/right if needed).

    Args:
        hidden_states: ``(B, H*W, C)`` tokens of an ``H x W`` grid, row-major.
        layout: the window layout (see ``window_layout``).

    Returns:
        ``(B * num_windows, w*w, C)``, windows of one image contiguous and row-major.
    """
    b, w = layout.batch_size, layout.window_size
    x = hidden_states.unflatten(1, (layout.height, layout.width))
    if layout.is_padded:
        x = F.pad(x, (0, 0, 0, layout.padded_width - layout.width, 0, layout.padded_height - layout.height))
    x = x.view(b, layout.padded_height // w, w, layout.padded_width // w, w, -1)
    return x.transpose(2, 3).reshape(b * layout.windows_per_image, w * w, -1)


def window_merge(windows: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Inverse of ``window_partition``: ``(B * num_windows, w*w, C)`` back to ``(B, H*W, C)``."""
    b, w = layout.batch_size, layout.window_size
    x = windows.view(b, layout.padded_height // w, layout.padded_width // w, w, w, -1)
    x = x.transpose(2, 3).reshape(b, layout.padded_height, layout.padded_width, -1)
    if layout.is_padded:
        x = x[:, : layout.height, : layout.width]
    return x.reshape(b, layout.height * layout.width, -1)


def window_layout(batch_size: int, height: int, width: int, window_size: int, pad: bool) -> WindowLayout:
    """Plan the windows for an ``height x width`` grid, padding up to whole windows when ``pad`` is set."""
    if not pad and (height % window_size or width % window_size):
        raise ValueError(
            f"The token grid must be a whole number of {window_size}x{window_size} attention windows, "
            f"but received a {height}x{width} grid. Expected height and width divisible by {window_size}."
        )
    padded_height = math.ceil(height / window_size) * window_size
    padded_width = math.ceil(width / window_size) * window_size
    return WindowLayout(batch_size, height, width, padded_height, padded_width, window_size)


class _PositionBiasCache(NamedTuple):
    """An attention mask built from a snapshot of the bias table, reused while the table still equals the snapshot."""

    table: torch.Tensor
    dtype: torch.dtype
    bias: torch.Tensor


class TimeDependentAttnProcessor:
    """Default TMSA processor: scaled dot-product attention through ``diffusers``' ``dispatch_attention_fn``.

    The relative position bias (and the padding mask, if any) goes in as an additive ``attn_mask``.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "TimeDependentSelfAttention",
        hidden_states: torch.Tensor,
        time_token: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        query, key, value, layout = attn.project_qkv(hidden_states, time_token, height, width)
        check_backend_takes_bias(self._attention_backend or _AttentionBackendRegistry._active_backend)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attn.attention_bias(layout, query.dtype),
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.project_out(out, layout)


class TimeDependentExplicitAttnProcessor:
    """Reference TMSA processor that writes out ``softmax(Q K^T / sqrt(d) + B) V`` (Eq. 6) step by step."""

    def __call__(
        self,
        attn: "TimeDependentSelfAttention",
        hidden_states: torch.Tensor,
        time_token: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        query, key, value, layout = attn.project_qkv(hidden_states, time_token, height, width)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B*nW, heads, N, d)
        scores = query @ key.transpose(-2, -1) * attn.scale + attn.attention_bias(layout, query.dtype)
        out = scores.softmax(dim=-1) @ value
        return attn.project_out(out.transpose(1, 2), layout)


class TimeDependentSelfAttention(nn.Module, AttentionModuleMixin):
    """Time-dependent multi-head self-attention (TMSA) over windows of a 2D token grid.

    Args:
        dim: token width ``C``.
        time_embed_dim: width ``D_t`` of the time token.
        num_heads: number of attention heads; ``dim`` must be divisible by it.
        window_size: side ``w`` of the square attention windows. Use the token grid's side for global attention.
        pad_to_window: pad grids that are not a whole number of windows (padded keys are masked out) instead of
            raising.
        bias: whether the spatial and time projections have biases.
        out_bias: whether the output projection has a bias.
        processor: an attention processor; defaults to ``TimeDependentAttnProcessor``.
    """

    _default_processor_cls = TimeDependentAttnProcessor
    _available_processors = [TimeDependentAttnProcessor, TimeDependentExplicitAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(
        self,
        dim: int,
        time_embed_dim: int,
        num_heads: int,
        window_size: int,
        pad_to_window: bool = False,
        bias: bool = True,
        out_bias: bool = True,
        processor: "TimeDependentAttnProcessor | TimeDependentExplicitAttnProcessor | None" = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        if window_size < 1:
            raise ValueError(f"`window_size` must be a positive integer, got {window_size}.")
        self.dim = dim
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.pad_to_window = pad_to_window

        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.time_to_qkv = nn.Linear(time_embed_dim, 3 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=out_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self._position_bias_cache: _PositionBiasCache | None = None

        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def relative_position_bias(self) -> torch.Tensor:
        """The bias ``B`` of Eq. 6 for one window, shape ``(heads, w*w, w*w)``, contiguous.

        One gather from the ``((2w-1)^2, heads)`` table serves every head and every window.
        """
        n = self.window_size**2
        table = self.relative_position_bias_table.t()  # (heads, (2w-1)^2)
        return table[:, self.relative_position_index.view(-1)].view(self.heads, n, n)

    def _can_cache_position_bias(self) -> bool:
        """Whether ``attention_bias`` may reuse a cached bias: inference on CPU, for a bias no larger than ``to_qkv``.

        Training and any forward that records gradients rebuild the bias so that gradients reach the table; under
        ``torch.compile`` the compiler handles the gather itself. The cache is CPU-only because checking that the
        table is unchanged reads it back, which on an accelerator would stall the stream to save a microsecond gather.
        The bias may be at most as large as the ``to_qkv`` weight, so caching adds at most a fifth to a block's memory
        (large global windows such as DiffiT-XL/2-512's 32x32 token grid rebuild it every forward instead).
        """
        if torch.compiler.is_compiling() or self.training or torch.is_grad_enabled():
            return False
        table = self.relative_position_bias_table
        bias_numel = self.heads * self.relative_position_index.numel()
        return table.device.type == "cpu" and bias_numel <= self.to_qkv.weight.numel()

    def _position_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``relative_position_bias()`` as a ``(1, heads, N, N)`` mask in ``dtype``, cached where allowed.

        The cache holds a copy of the table it was built from and is used only while the table still equals that copy,
        so any change of the weights (``load_state_dict``, optimiser steps, writes through ``.data`` as in EMA swaps,
        ``.to()``) rebuilds the bias.
        """
        if not self._can_cache_position_bias():
            return self.relative_position_bias().to(dtype).unsqueeze(0)
        table, cache = self.relative_position_bias_table, self._position_bias_cache
        if cache is not None and cache.dtype == dtype and cache.table.dtype == table.dtype and torch.equal(
            cache.table, table
        ):
            return cache.bias
        bias = self.relative_position_bias().to(dtype).unsqueeze(0)
        self._position_bias_cache = _PositionBiasCache(table.detach().clone(), dtype, bias)
        return bias

    def attention_bias(self, layout: WindowLayout, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask: the position bias, plus ``-inf`` on padded keys when the grid was padded.

        Returns:
            ``(1, heads, N, N)`` without padding, else ``(B * num_windows, heads, N, N)``.
        """
        bias = self._position_bias(dtype)
        if not layout.is_padded:
            return bias
        valid = torch.ones(1, layout.height * layout.width, 1, device=bias.device)
        key_is_real = window_partition(valid, replace(layout, batch_size=1))  # (nW, N, 1)
        pad_mask = torch.zeros_like(key_is_real, dtype=dtype).masked_fill(key_is_real == 0, float("-inf"))
        mask = bias + pad_mask.transpose(1, 2).unsqueeze(1)  # (nW, heads, N, N)
        return mask.repeat(layout.batch_size, 1, 1, 1)

    def project_qkv(
        self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, WindowLayout]:
        """Eq. 3-5: per-window queries, keys and values from spatial tokens plus the time token.

        Args:
            hidden_states: ``(B, H*W, C)``.
            time_token: ``(B, D_t)``.

        Returns:
            ``query, key, value`` of shape ``(B * num_windows, w*w, heads, head_dim)`` and the window layout.
        """
        batch_size, num_tokens, channels = hidden_states.shape
        if num_tokens != height * width:
            raise ValueError(
                f"`hidden_states` has {num_tokens} tokens but the grid is {height}x{width} = {height * width}."
            )
        if channels != self.dim:
            raise ValueError(f"Expected tokens of width {self.dim}, received {channels}.")
        if time_token.shape != (batch_size, self.time_to_qkv.in_features):
            raise ValueError(
                f"Expected `time_token` of shape ({batch_size}, {self.time_to_qkv.in_features}), "
                f"received {tuple(time_token.shape)}."
            )
        layout = window_layout(batch_size, height, width, self.window_size, self.pad_to_window)
        windows = window_partition(hidden_states, layout)
        # The time term is shared by all tokens of an image: add it in place rather than making a second full tensor.
        qkv = self.to_qkv(windows.view(batch_size, -1, channels))
        qkv = qkv.add_(self.time_to_qkv(time_token).unsqueeze(1))
        qkv = qkv.view(batch_size * layout.windows_per_image, -1, 3, self.heads, self.head_dim)
        query, key, value = qkv.unbind(dim=2)
        return query, key, value, layout

    def project_out(self, attention_output: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Merge heads and windows and apply the output projection: ``(B*nW, N, heads, d)`` -> ``(B, H*W, C)``."""
        out = self.to_out(attention_output.flatten(2))
        return window_merge(out, layout)

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Apply TMSA to ``hidden_states`` ``(B, H*W, C)`` with ``time_token`` ``(B, D_t)``; returns ``(B, H*W, C)``."""
        return self.processor(self, hidden_states, time_token, height, width)


class DiffiTAttentionMixin(AttentionMixin):
    """``attn_processors``, ``set_attn_processor`` and a bias-aware ``set_attention_backend`` for DiffiT models.

    List it before ``ModelMixin`` in the bases so its ``set_attention_backend`` runs first.
    """

    def set_attention_backend(self, backend: str) -> None:
        """Route every TMSA layer through ``backend``; it must take an additive mask (see ``MASK_CAPABLE_BACKENDS``)."""
        check_backend_takes_bias(backend)
        super().set_attention_backend(backend)
