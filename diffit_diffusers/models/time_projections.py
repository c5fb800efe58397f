"""A TMSA layer's three time-dependent projections (DiffiT Eq. 3-5) as one autograd node, for CPU training.

    q = x_s W_qs^T + b_qs + x_t W_qt^T + b_qt,   and likewise k and v                      (Eq. 3-5)

Through autograd each projection is two linear layers and a broadcast add, about ten graph nodes with the views and
transposes they record, and backward adds up the three gradients that reach ``x_s`` (and ``x_t``) in passes of
their own. ``TimeDependentProjections`` runs the same products on the same kernels (oneDNN's where ``OneDNNLinear``
runs them there) and computes, for every projection with output gradient ``dq``,

    dW_s = dq^T x_s,   dx_s = sum over q, k, v of dq W_s          (the sum accumulated in the products)
    g = dq summed over each image's tokens,   db_s = db_t = g summed over the images
    dW_t = g^T x_t,    dx_t = sum over q, k, v of g W_t

in one node. Its backward is written in differentiable ops, so a double backward (a gradient penalty) works too.
"""

from __future__ import annotations

import torch

from .linear import OneDNNLinear
from .plain_modules import runs_own_forward


class TimeDependentProjections(torch.autograd.Function):
    """``(q, k, v)`` of Eq. 3-5 with the gradients of the tokens, the time token and the six layers' parameters.

    ``tokens``: ``(B * L, C)``, the ``L`` tokens of each image together; ``time_token``: ``(B, D_t)``;
    ``projections``: the ``(spatial, temporal)`` layer pairs of q, k and v; ``parameters``: their weights and biases
    in that order (``W_s, b_s, W_t, b_t`` per pair, ``None`` for a missing bias), passed so that autograd routes their
    gradients. Returns three ``(B * L, C_out)`` tensors.
    """

    @staticmethod
    def forward(ctx, tokens, time_token, projections, *parameters):
        batch_size = time_token.shape[0]
        outputs, kernels = [], []
        for spatial, temporal in projections:
            spatial_onednn, temporal_onednn = spatial.runs_on_onednn(tokens), temporal.runs_on_onednn(time_token)
            out = spatial.forward_on(tokens, spatial_onednn)
            time_term = temporal.forward_on(time_token, temporal_onednn)
            out.view(batch_size, -1, spatial.out_features).add_(time_term.unsqueeze(1))
            outputs.append(out)
            kernels.append((spatial_onednn, temporal_onednn))
        ctx.projections, ctx.kernels = projections, kernels
        ctx.save_for_backward(tokens, time_token, *(p for p in parameters if p is not None))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        tokens, time_token = ctx.saved_tensors[:2]  # unpacking the parameters too checks they were not modified
        needs_tokens, needs_time = ctx.needs_input_grad[:2]
        batch_size = time_token.shape[0]
        grad_tokens = grad_time = None
        parameter_grads = []
        for index, ((spatial, temporal), (spatial_onednn, temporal_onednn), grad) in enumerate(
            zip(ctx.projections, ctx.kernels, grad_outputs)
        ):
            needs_spatial_weight, needs_spatial_bias, needs_time_weight, needs_time_bias = (
                ctx.needs_input_grad[3 + 4 * index : 7 + 4 * index]
            )
            per_image = grad.reshape(batch_size, -1, spatial.out_features).sum(1)  # (B, C_out)
            grad_tokens, spatial_weight_grad = spatial.product_gradients(
                grad, tokens, spatial_onednn, grad_tokens, needs_tokens, needs_spatial_weight
            )
            grad_time, time_weight_grad = temporal.product_gradients(
                per_image, time_token, temporal_onednn, grad_time, needs_time, needs_time_weight
            )
            bias_grad = per_image.sum(0) if needs_spatial_bias or needs_time_bias else None
            parameter_grads += [
                spatial_weight_grad,
                bias_grad if needs_spatial_bias else None,
                time_weight_grad,
                bias_grad.clone() if needs_time_bias else None,  # its own tensor: each becomes a `.grad`
            ]
        return grad_tokens, grad_time, None, *parameter_grads


def projections_node_applies(attn: torch.nn.Module, tokens: torch.Tensor) -> bool:
    """Whether ``time_dependent_projections`` should compute ``attn``'s Eq. 3-5: a CPU forward that records
    gradients, outside autocast and ``torch.compile``, with separate projections that are all plain
    ``OneDNNLinear`` layers with plain weights (a LoRA, quantized or hooked layer goes through autograd as usual)."""
    return (
        torch.is_grad_enabled()
        and tokens.device.type == "cpu"
        and not attn.fused_projections
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and all(
            runs_own_forward(layer, OneDNNLinear) and type(layer.weight.data) is torch.Tensor
            for layer in projection_layers(attn)
        )
    )


def projection_pairs(attn: torch.nn.Module) -> tuple[tuple[OneDNNLinear, OneDNNLinear], ...]:
    """The ``(spatial, temporal)`` projections of q, k and v of a TMSA layer: ``(to_q, time_to_q)``, ``(to_k,
    time_to_k)``, ``(to_v, time_to_v)``."""
    return ((attn.to_q, attn.time_to_q), (attn.to_k, attn.time_to_k), (attn.to_v, attn.time_to_v))


def projection_layers(attn: torch.nn.Module) -> tuple[OneDNNLinear, ...]:
    """``to_q, time_to_q, to_k, time_to_k, to_v, time_to_v`` of a TMSA layer."""
    return tuple(layer for pair in projection_pairs(attn) for layer in pair)


def time_dependent_projections(
    attn: torch.nn.Module, tokens: torch.Tensor, time_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 3-5 in one autograd node: ``(B * L, C)`` tokens (each image's ``L`` together) and the ``(B, D_t)`` time
    token -> ``q, k, v``, each ``(B * L, C)``."""
    parameters = [parameter for layer in projection_layers(attn) for parameter in (layer.weight, layer.bias)]
    return TimeDependentProjections.apply(tokens, time_token, projection_pairs(attn), *parameters)
