"""Time-dependent multi-head self-attention (TMSA), DiffiT paper Section 3.2, Eq. 3-6.

Queries, keys and values are linear functions of the spatial tokens *and* of the time token:

    q = x_s W_qs + x_t W_qt,    k = x_s W_ks + x_t W_kt,    v = x_s W_vs + x_t W_vt        (Eq. 3-5)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V                                  (Eq. 6)

where ``B`` is a learned Swin-style relative position bias. Attention runs inside non-overlapping
``window_size x window_size`` windows; a window as large as the token grid gives global attention.

The module follows diffusers' attention interface: ``TimeDependentSelfAttention`` is an ``AttentionModuleMixin``
that holds the parameters (separate ``to_q``/``to_k``/``to_v`` and ``time_to_q``/``time_to_k``/``time_to_v``
projections, fusable with ``fuse_qkv_projections()``); its processors compute Eq. 3-6, the default one through
``dispatch_attention_fn``, so ``set_attention_backend``, ``set_attn_processor`` and ``attn_processors`` work on every
model built from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .biased_attention import attention_mask, biased_window_attention, fused_cpu_training_applies
from .linear import OneDNNLinear
from .time_projections import projection_pairs, projections_node_applies, time_dependent_projections


#: Attention backends that accept an additive float ``attn_mask``, which carries the relative position bias.
MASK_CAPABLE_BACKENDS: tuple[AttentionBackendName, ...] = (
    AttentionBackendName.NATIVE,
    AttentionBackendName._NATIVE_MATH,
    AttentionBackendName._NATIVE_EFFICIENT,
    AttentionBackendName._NATIVE_CUDNN,
    AttentionBackendName.FLEX,
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
    """Inverse of ``window_partition``: ``(B * num_windows, w*w, ...)`` back to ``(B, H*W, C)``, the trailing dims
    flattened into ``C``.

    Windows of any strides (such as attention's ``(B * num_windows, w*w, heads, head_dim)`` output, which is
    head-major in memory) are gathered in one copy, plus one for the crop of a padded grid.
    """
    b, w = layout.batch_size, layout.window_size
    x = windows.unflatten(0, (b, layout.padded_height // w, layout.padded_width // w)).unflatten(3, (w, w))
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


def padding_mask(layout: WindowLayout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask that hides the padded keys of every window: ``0`` on real tokens, ``-inf`` on padding.

    Returns:
        ``(num_windows, 1, 1, w*w)`` for one image; the same for every image of the batch.
    """
    real = torch.ones(1, layout.height * layout.width, 1, device=device, dtype=dtype)
    key_is_real = window_partition(real, replace(layout, batch_size=1))  # (nW, N, 1), 0 on padding
    return torch.zeros_like(key_is_real).masked_fill_(key_is_real == 0, float("-inf")).view(-1, 1, 1, key_is_real.shape[1])


def time_dependent_qkv(
    attn: "TimeDependentSelfAttention", windows: torch.Tensor, time_token: torch.Tensor, layout: WindowLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3-5: ``q = x_s W_qs + x_t W_qt`` (and likewise ``k``, ``v``) for every token of every window.

    Args:
        windows: ``(B * num_windows, w*w, C)`` window tokens (see ``window_partition``).
        time_token: ``(B, D_t)``.

    Returns:
        ``query, key, value``, each ``(B * num_windows, w*w, heads, head_dim)``.
    """
    windowed = (layout.batch_size * layout.windows_per_image, -1)
    if projections_node_applies(attn, windows):  # CPU training: all three in one autograd node
        projections = time_dependent_projections(attn, windows.reshape(-1, attn.dim), time_token)
        return tuple(projection.view(*windowed, attn.heads, attn.head_dim) for projection in projections)
    # The windows of one image side by side, so that image's time term broadcasts over all its tokens.
    tokens = windows.view(layout.batch_size, -1, attn.dim)
    time_token = time_token.unsqueeze(1)
    if attn.fused_projections:
        qkv = add_time_term(attn.to_qkv(tokens), attn.time_to_qkv(time_token))  # (B, nW*N, 3C)
        return qkv.view(*windowed, 3, attn.heads, attn.head_dim).unbind(dim=2)
    # Separate products: in training each projection's gradient then arrives whole, with no stacking of q, k, v.
    return tuple(
        add_time_term(spatial(tokens), temporal(time_token)).view(*windowed, attn.heads, attn.head_dim)
        for spatial, temporal in projection_pairs(attn)
    )


def add_time_term(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """``x_s W_s + x_t W_t`` of Eq. 3-5: ``(B, L, D)`` spatial term plus the ``(B, 1, D)`` time term.

    In place when no gradient is recorded; out of place otherwise, because an in-place add on a linear layer's
    output (a view) makes autograd copy the whole tensor back in backward.
    """
    if torch.is_grad_enabled():
        return spatial + temporal
    return spatial.add_(temporal)


class TimeDependentAttnProcessor:
    """Default TMSA processor: Eq. 3-6 with scaled dot-product attention through ``dispatch_attention_fn``.

    The relative position bias (plus ``-inf`` on padded keys) goes in as an additive ``attn_mask``. Training on CPU
    with the ``native`` backend runs ``biased_window_attention`` instead, one autograd node with the bias gradient,
    where SDPA would fall back to its math kernel (see :mod:`diffit_diffusers.models.biased_attention`).
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
        backend = self._attention_backend or _AttentionBackendRegistry._active_backend
        check_backend_takes_bias(backend)
        layout, query, key, value = attn.windowed_qkv(hidden_states, time_token, height, width)  # Eq. 3-5

        # Eq. 6's B, one (heads, N, N) bias for every window; padded keys get -inf.
        bias = attn.relative_position_bias().to(query.dtype)
        key_padding = padding_mask(layout, query.dtype, query.device) if layout.is_padded else None
        if backend == AttentionBackendName.NATIVE and fused_cpu_training_applies(query, bias):
            out = biased_window_attention(query, key, value, bias, attn.scale, key_padding)  # Eq. 6
            return attn.project_out(out, layout)

        # Eq. 6: softmax(Q K^T / sqrt(d) + B) V
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask(bias, key_padding, layout.batch_size),
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
        layout, query, key, value = attn.windowed_qkv(hidden_states, time_token, height, width)  # Eq. 3-5
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B*nW, heads, N, d)
        scores = query @ key.transpose(-2, -1) * attn.scale + attn.relative_position_bias()  # (B*nW, heads, N, N)
        if layout.is_padded:
            scores = scores.unflatten(0, (layout.batch_size, -1)) + padding_mask(layout, scores.dtype, scores.device)
            scores = scores.flatten(0, 1)
        out = scores.softmax(dim=-1) @ value  # Eq. 6
        return attn.project_out(out.transpose(1, 2), layout)


class TimeDependentFlexAttnProcessor:
    """TMSA on PyTorch's FlexAttention: the relative position bias as a ``score_mod`` reading the bias table, padded
    keys removed by a ``block_mask``.

    ``set_attention_backend("flex")`` installs it on every TMSA layer. On CPU, PyTorch's FlexAttention runs forwards
    only (it has no CPU backward): use it for inference there and train with the default processor.
    """

    def __call__(
        self,
        attn: "TimeDependentSelfAttention",
        hidden_states: torch.Tensor,
        time_token: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        self._check_device_supports_backward(attn, hidden_states)
        layout, query, key, value = attn.windowed_qkv(hidden_states, time_token, height, width)  # Eq. 3-5

        table, index = attn.relative_position_bias_table, attn.relative_position_index

        def relative_position_score(score, batch, head, query_index, key_index):  # Eq. 6: Q K^T / sqrt(d) + B
            return score + table[index[query_index, key_index], head].to(score.dtype)

        block_mask = None
        if layout.is_padded:
            key_is_real = padding_mask(layout, torch.float32, query.device).view(layout.windows_per_image, -1) == 0

            def real_keys(batch, head, query_index, key_index):
                return key_is_real[batch % layout.windows_per_image, key_index]

            tokens = query.shape[1]
            block_mask = create_block_mask(real_keys, query.shape[0], None, tokens, tokens, device=query.device)

        out = flex_attention(  # q, k, v as their own (B * nW, heads, N, d) buffers, which inductor's CPU template needs
            *(t.transpose(1, 2).contiguous() for t in (query, key, value)),
            score_mod=relative_position_score,
            block_mask=block_mask,
            scale=attn.scale,
        )
        return attn.project_out(out.transpose(1, 2), layout)

    def _check_device_supports_backward(self, attn: "TimeDependentSelfAttention", hidden_states: torch.Tensor) -> None:
        """Raise a ``ValueError`` for a CPU forward that records gradients, which FlexAttention cannot back-propagate."""
        needs_grad = hidden_states.requires_grad or any(p.requires_grad for p in attn.parameters())
        if hidden_states.device.type == "cpu" and torch.is_grad_enabled() and needs_grad:
            raise ValueError(
                "PyTorch's FlexAttention has no backward on CPU. Run CPU forwards under `torch.no_grad()` (or with "
                "parameters that do not require grad), or train on CPU with the default attention backend "
                "(`set_attention_backend('native')`)."
            )


#: The fused projection of each group and the separate projections it stacks (in this order along its outputs).
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "time_to_qkv": ("time_to_q", "time_to_k", "time_to_v"),
}


def unfused_projection_items(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Split a state-dict entry of a fused ``to_qkv`` / ``time_to_qkv`` layer into its three projections' entries
    (``...to_qkv.weight`` -> ``...to_q.weight``, ``...to_k.weight``, ``...to_v.weight``); yield other entries as
    they are."""
    module_path, _, parameter = key.rpartition(".")
    parent, _, name = module_path.rpartition(".")
    if name not in FUSED_PROJECTIONS:
        yield key, tensor
        return
    for part, chunk in zip(FUSED_PROJECTIONS[name], tensor.chunk(3)):
        yield ".".join(filter(None, (parent, part, parameter))), chunk


def match_projection_keys(state_dict: dict[str, torch.Tensor], prefix: str, fused: bool) -> None:
    """Make one TMSA layer's entries of ``state_dict`` (keys starting with ``prefix``) fit the layer, in place.

    Checkpoints saved before the projections were separate hold only ``to_qkv`` / ``time_to_qkv``: they are split.
    A fused layer (``fuse_qkv_projections()``) also gets the stacked entries when the checkpoint has only the
    separate ones; an unfused layer drops stacked entries.
    """
    for fused_name, parts in FUSED_PROJECTIONS.items():
        for parameter in ("weight", "bias"):
            fused_key = f"{prefix}{fused_name}.{parameter}"
            part_keys = [f"{prefix}{part}.{parameter}" for part in parts]
            if fused_key in state_dict and part_keys[0] not in state_dict:
                state_dict.update(unfused_projection_items(fused_key, state_dict[fused_key]))
            if not fused:
                state_dict.pop(fused_key, None)
            elif fused_key not in state_dict and all(key in state_dict for key in part_keys):
                state_dict[fused_key] = torch.cat([state_dict[key] for key in part_keys])


class TimeDependentSelfAttention(nn.Module, AttentionModuleMixin):
    """Time-dependent multi-head self-attention (TMSA) over windows of a 2D token grid.

    Holds the parameters of Eq. 3-6: the spatial projections ``to_q``, ``to_k``, ``to_v`` (``W_qs``, ``W_ks``,
    ``W_vs``), the time-token projections ``time_to_q``, ``time_to_k``, ``time_to_v`` (``W_qt``, ``W_kt``,
    ``W_vt``), the output projection ``to_out`` and the relative position bias table. The processor computes the
    attention. ``fuse_qkv_projections()`` on the model adds the stacked ``to_qkv`` and ``time_to_qkv`` projections
    (one matrix product each) and ``unfuse_qkv_projections()`` removes them, as for diffusers' attention layers.

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
    _available_processors = [TimeDependentAttnProcessor, TimeDependentExplicitAttnProcessor, TimeDependentFlexAttnProcessor]
    _supports_qkv_fusion = True

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
        self.time_embed_dim = time_embed_dim
        self.heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.pad_to_window = pad_to_window
        self.use_bias = bias

        self.to_q = OneDNNLinear(dim, dim, bias=bias)
        self.to_k = OneDNNLinear(dim, dim, bias=bias)
        self.to_v = OneDNNLinear(dim, dim, bias=bias)
        self.time_to_q = OneDNNLinear(time_embed_dim, dim, bias=bias)
        self.time_to_k = OneDNNLinear(time_embed_dim, dim, bias=bias)
        self.time_to_v = OneDNNLinear(time_embed_dim, dim, bias=bias)
        self.to_out = OneDNNLinear(dim, dim, bias=out_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def relative_position_bias(self) -> torch.Tensor:
        """The bias ``B`` of Eq. 6 for one window, shape ``(heads, w*w, w*w)``, contiguous.

        One gather from the ``((2w-1)^2, heads)`` table serves every head and every window. It runs as
        ``index_select`` on the transposed table, whose backward (``index_add``) is about three times faster on a
        CPU than that of advanced indexing (an accumulating ``index_put``) for a 16x16 window.
        """
        n = self.window_size**2
        table = self.relative_position_bias_table.t().contiguous()  # (heads, (2w-1)^2)
        return table.index_select(1, self.relative_position_index.view(-1)).view(self.heads, n, n)

    def window_layout(
        self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int
    ) -> WindowLayout:
        """Check the inputs of a forward and plan its windows.

        Args:
            hidden_states: ``(B, H*W, C)`` tokens of a ``height x width`` grid.
            time_token: ``(B, D_t)``.
        """
        batch_size, num_tokens, channels = hidden_states.shape
        if num_tokens != height * width:
            raise ValueError(
                f"`hidden_states` has {num_tokens} tokens but the grid is {height}x{width} = {height * width}."
            )
        if channels != self.dim:
            raise ValueError(f"Expected tokens of width {self.dim}, received {channels}.")
        if time_token.shape != (batch_size, self.time_embed_dim):
            raise ValueError(
                f"Expected `time_token` of shape ({batch_size}, {self.time_embed_dim}), "
                f"received {tuple(time_token.shape)}."
            )
        return window_layout(batch_size, height, width, self.window_size, self.pad_to_window)

    def windowed_qkv(
        self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int
    ) -> tuple[WindowLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every processor starts with: check the inputs, cut ``(B, H*W, C)`` into windows and compute Eq. 3-5.

        Returns:
            The window layout and ``query, key, value``, each ``(B * num_windows, w*w, heads, head_dim)``.
        """
        layout = self.window_layout(hidden_states, time_token, height, width)
        return (layout, *time_dependent_qkv(self, window_partition(hidden_states, layout), time_token, layout))

    def project_out(self, attention_output: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """What every processor ends with: the ``(B * num_windows, w*w, heads, head_dim)`` attention output merged
        back into ``(B, H*W, C)`` tokens, then ``to_out``.

        Merging first makes the heads' outputs contiguous and crops a padded grid in the same copies, so ``to_out``
        runs on the real tokens only.
        """
        return self.to_out(window_merge(attention_output, layout))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Add ``to_qkv`` and ``time_to_qkv``, the stacked spatial and time projections, and use them."""
        if self.fused_projections:
            return
        for fused, parts in FUSED_PROJECTIONS.items():
            layers = [getattr(self, part) for part in parts]
            stacked = OneDNNLinear(
                layers[0].in_features, 3 * self.dim, bias=self.use_bias, device=layers[0].weight.device,
                dtype=layers[0].weight.dtype,
            )
            stacked.use_onednn = getattr(layers[0], "use_onednn", stacked.use_onednn)
            stacked.min_features = getattr(layers[0], "min_features", stacked.min_features)
            stacked.weight.copy_(torch.cat([layer.weight for layer in layers]))
            if self.use_bias:
                stacked.bias.copy_(torch.cat([layer.bias for layer in layers]))
            setattr(self, fused, stacked)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        """Remove ``to_qkv`` and ``time_to_qkv``; the separate projections are used again."""
        if not self.fused_projections:
            return
        for fused in FUSED_PROJECTIONS:
            delattr(self, fused)
        self.fused_projections = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        match_projection_keys(state_dict, prefix, fused=self.fused_projections)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Apply TMSA to ``hidden_states`` ``(B, H*W, C)`` with ``time_token`` ``(B, D_t)``; returns ``(B, H*W, C)``."""
        return self.processor(self, hidden_states, time_token, height, width)


class DiffiTAttentionMixin(AttentionMixin):
    """``attn_processors``, ``set_attn_processor``, ``fuse_qkv_projections`` and a bias-aware
    ``set_attention_backend`` for DiffiT models, and the loading of checkpoints saved with fused projections.

    List it before ``ModelMixin`` in the bases so its methods run first.
    """

    def set_attention_backend(self, backend: str) -> None:
        """Route every TMSA layer through ``backend``; it must take an additive mask (see ``MASK_CAPABLE_BACKENDS``).

        ``"flex"`` installs ``TimeDependentFlexAttnProcessor`` (bias as ``score_mod``, padding as ``block_mask``) on
        this model's layers only, leaving diffusers' process-wide active backend alone; any other backend puts the
        default processor back and is set the diffusers way.
        """
        check_backend_takes_bias(backend)
        if AttentionBackendName(str(backend).lower()) == AttentionBackendName.FLEX:
            self._replace_processors(TimeDependentAttnProcessor, TimeDependentFlexAttnProcessor)
            return
        self._replace_processors(TimeDependentFlexAttnProcessor, TimeDependentAttnProcessor)
        super().set_attention_backend(backend)

    def reset_attention_backend(self) -> None:
        """Back to the default processor and diffusers' default backend on every TMSA layer."""
        self._replace_processors(TimeDependentFlexAttnProcessor, TimeDependentAttnProcessor)
        super().reset_attention_backend()

    def _replace_processors(self, old_cls: type, new_cls: type) -> None:
        for module in self.modules():
            if isinstance(module, TimeDependentSelfAttention) and type(module.processor) is old_cls:
                module.set_processor(new_cls())

    def _fix_state_dict_keys_on_load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """``from_pretrained``'s key fix-up: split the fused ``to_qkv`` / ``time_to_qkv`` weights of older folders."""
        super()._fix_state_dict_keys_on_load(state_dict)
        for name, module in self.named_modules():
            if isinstance(module, TimeDependentSelfAttention):
                match_projection_keys(state_dict, f"{name}.", fused=module.fused_projections)
