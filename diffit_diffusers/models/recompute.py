"""Activation recomputation: keep the cheap norm and activation outputs out of the saved-for-backward set.

In a training step most of a DiffiT block's saved activations are outputs of elementwise layers that the next layer
needs for its backward: ``GroupNorm(x)`` and ``SiLU(GroupNorm(x))`` before a ResBlock's convolution (Eq. 9),
``LN(x)`` before the MLP's first linear layer and ``GELU(h)`` before its second (Eq. 8). Inside a
``BackwardRecomputation`` context the output of a layer called through ``recompute(layer, x)`` is saved as that call
instead of its values; backward repeats the call when it needs the tensor (once, however many layers saved it) and
frees the result after its last use. Only elementwise layers are recomputed, never a convolution or matrix
product, and the autograd graph is the usual one, so outputs and gradients are exactly those of the plain forward.
A GroupNorm called through ``group_norm(norm, x)`` is recomputed from the mean and rstd its forward kept for its own
backward, as ``x * scale + shift`` in one ``addcmul`` (bitwise what PyTorch's kernel returns), rather than by
rerunning the norm.

The mechanism is autograd's saved-tensor hooks, as in ``torch.utils.checkpoint``, without a checkpoint's re-run of the
forward code (whose fixed cost per call is several times a small block's whole backward on CPU). It steps aside when
other saved-tensor hooks are active (``enable_gradient_checkpointing()``, ``torch.autograd.graph.save_on_cpu``) and
under ``torch.compile``, whose partitioner makes its own recomputation choices.

The U-Net recomputes by default while gradients are recorded (keeping everything, ``cifar10-32`` trains in 1.9x the
memory of its ``UNet2DModel`` peer, 1.25x with recomputation); ``disable_activation_recomputation()`` keeps every
activation instead (more memory, a little less work). The latent model keeps every activation by default: it trains
below DiT's memory either way, and the recomputed tanh GELU and LayerNorm cost it 3-5% of a CPU training step;
``enable_activation_recomputation()`` switches recomputation on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from .plain_modules import runs_own_forward


class _Recipe:
    """A saved tensor stored as the layer call that recomputes it; the result is cached until its last use."""

    def __init__(self, output: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor], source):
        self.layer = layer
        self.source = source  # the layer's input: a kept tensor, or the _Recipe of a recomputed one
        self.layout = (output.shape, output.stride(), output.dtype, output.device)
        self.uses = 0
        self.unpacked = 0
        self._value: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        if self._value is None:
            source = self.source.value() if isinstance(self.source, _Recipe) else self.source
            with torch.no_grad():
                value = self.layer(source)
            if (value.shape, value.stride(), value.dtype, value.device) != self.layout:
                raise RuntimeError("Activation recomputation produced a tensor of another layout than the forward's.")
            self._value = value
        return self._value

    def unpack(self, view: tuple[torch.Size, tuple[int, ...], int]) -> torch.Tensor:
        """The saved view of the recomputed tensor; the cache is dropped once every saving layer has its copy."""
        size, stride, offset = view
        value = self.value()
        self.unpacked += 1
        if self.unpacked >= self.uses:
            self._value = None
        return value.as_strided(size, stride, value.storage_offset() + offset)


class BackwardRecomputation(saved_tensors_hooks):
    """Saved-tensor hooks under which the outputs of layers called through ``recompute`` (and views of them) are
    saved as recipes, recomputed in backward. Use it as a context manager around a segment of layers.

    ``recompute(layer, x)`` is ``layer(x)``; ``x`` is kept (the layer's backward keeps it anyway) unless it is itself
    the output of an earlier ``recompute`` in the segment, which is then recomputed first.
    """

    def __init__(self):
        self._recipes: list[tuple[torch.Tensor, _Recipe]] = []
        super().__init__(self._pack, self._unpack)

    def recompute(self, layer: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        return self._save_as_recipe(layer(inputs), layer, inputs)

    def group_norm(self, norm: nn.GroupNorm, inputs: torch.Tensor) -> torch.Tensor:
        """``norm(inputs)`` for a ``(B, C, H, W)`` map, recomputed in backward from this forward's statistics.

        The recomputation is ``GroupNorm(x) = x * (rstd * gamma) + (beta - mean * rstd * gamma)``, one elementwise
        pass with the forward's per-group ``mean`` and ``rstd``, where rerunning ``norm`` computes the statistics
        again (PyTorch's channels-last kernel takes 4-10x as long on a CPU for 4-12 channels per group). The
        forward runs PyTorch's own kernel (the same autograd node as ``norm``). A GroupNorm with hooks, a subclass,
        or without an affine transform, and any GroupNorm under autocast (which casts ``norm``'s input on GPUs), is
        recomputed by calling it.
        """
        if not _is_plain_affine_group_norm(norm) or torch.is_autocast_enabled(inputs.device.type):
            return self.recompute(norm, inputs)
        batch_size, channels = inputs.shape[:2]
        output, mean, rstd = torch.native_group_norm(
            inputs, norm.weight, norm.bias, batch_size, channels, inputs[0, 0].numel(), norm.num_groups, norm.eps
        )
        recompute = partial(_group_norm_from_statistics, norm=norm, mean=mean.detach(), rstd=rstd.detach())
        return self._save_as_recipe(output, recompute, inputs)

    def _save_as_recipe(self, output: torch.Tensor, layer: Callable[[torch.Tensor], torch.Tensor], inputs):
        source = next((recipe for tensor, recipe in self._recipes if tensor is inputs), inputs)
        self._recipes.append((output, _Recipe(output, layer, source)))
        return output

    def __enter__(self) -> "BackwardRecomputation":
        super().__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._recipes.clear()  # the recipes stay with the graph; the forward tensors must not
        super().__exit__(*exc_info)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage().data_ptr()
        for candidate, recipe in self._recipes:
            if storage == candidate.untyped_storage().data_ptr() and tensor.dtype == candidate.dtype:
                recipe.uses += 1
                return recipe, (tensor.shape, tensor.stride(), tensor.storage_offset() - candidate.storage_offset())
        return tensor

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        if isinstance(packed, tuple):
            recipe, view = packed
            return recipe.unpack(view)
        return packed


def _is_plain_affine_group_norm(norm: nn.Module) -> bool:
    """Whether calling ``norm`` runs exactly ``nn.GroupNorm.forward`` with a learned scale and shift."""
    return runs_own_forward(norm, nn.GroupNorm) and norm.affine


def _group_norm_from_statistics(
    inputs: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """``x * scale + shift`` with ``scale = rstd * gamma`` and ``shift = beta - mean * scale`` per image and channel,
    from the ``(B, groups)`` statistics of a GroupNorm forward: ``(B, C, H, W) -> (B, C, H, W)``, in the input's
    memory format."""
    batch_size, channels = inputs.shape[:2]
    per_channel = (batch_size, norm.num_groups, channels // norm.num_groups)
    scale = (rstd.unsqueeze(-1) * norm.weight.view(per_channel[1:])).view(batch_size, channels, 1, 1)
    minus_mean = -mean.unsqueeze(-1).expand(per_channel).reshape(batch_size, channels, 1, 1)
    shift = torch.addcmul(norm.bias.view(1, channels, 1, 1), minus_mean, scale)
    return torch.addcmul(shift, inputs, scale)


def recomputation_applies(enabled: bool) -> bool:
    """Whether a layer with recomputation ``enabled`` recomputes in this forward: gradients are recorded, nothing
    else manages saved tensors (gradient checkpointing, offloading to CPU) and the code is not being compiled."""
    return (
        enabled
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


class ActivationRecomputation:
    """Flag of a layer that can recompute its norm/activation outputs in backward."""

    recompute_activations: bool = True


class ActivationRecomputationMixin:
    """``enable_activation_recomputation`` / ``disable_activation_recomputation`` for a DiffiT model."""

    def enable_activation_recomputation(self) -> None:
        """Recompute norm and activation outputs in backward instead of keeping them (the U-Net's default)."""
        self._set_activation_recomputation(True)

    def disable_activation_recomputation(self) -> None:
        """Keep every activation for backward: more memory, no recomputation (the latent model's default)."""
        self._set_activation_recomputation(False)

    def _set_activation_recomputation(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, ActivationRecomputation):
                module.recompute_activations = enabled
