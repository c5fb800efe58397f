"""Windowed attention with a learned additive bias for CPU training, with its backward (DiffiT Eq. 6).

PyTorch's CPU ``scaled_dot_product_attention`` runs a fused kernel only while the mask needs no gradient. DiffiT's
relative position bias does need one in training, which sends SDPA to its math kernel, a dozen separate ops per
call with their own saved tensors. ``biased_window_attention`` computes the same attention and its gradients in one
autograd node, in one of two ways:

- windows of at most ``head_dim`` tokens (the U-Net's 4x4 windows), where the probabilities are no larger than the
  query: the scores and softmax are computed directly and the probabilities ``P`` are kept for backward;
- larger windows (the latent models' global attention): PyTorch's fused flash kernel, which keeps only the
  log-sum-exp ``lse`` of every score row; backward recomputes ``P = exp(S - lse)`` once, as
  ``exp2((S - lse) log2 e)``: ``torch.exp`` calls MKL's ``vsExp``, which on AMD CPUs runs a generic kernel
  (``mkl_vml_kernel_sExp_EXHAynn`` in ``perf``), and ``torch.exp2`` PyTorch's own vectorised one (1.7 against
  3.2 ms for 12.6M floats on a Zen 3 core).

Either way ``S = Q K^T * scale + B (+ padding)`` and the backward is

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(P * dP))
    dQ = dS K * scale,   dK = dS^T Q * scale,   dB = sum of dS over all windows

Each ``N x N`` tensor is written in place where the next step allows it (scores into probabilities, ``dP`` into
``dS``), so a call allocates at most two of them.
"""

from __future__ import annotations

import math

import torch


#: Dtypes in which both ways agree with SDPA's math kernel to the dtype's rounding (float32 measured, float64 tested).
FUSED_CPU_TRAINING_DTYPES = (torch.float32, torch.float64)


def fused_cpu_training_applies(query: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``biased_window_attention`` should replace SDPA: a CPU forward whose bias needs a gradient, in a
    dtype of ``FUSED_CPU_TRAINING_DTYPES``, not under ``torch.compile`` (which traces SDPA itself), and with SDPA's
    flash kernel allowed (so ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` still gets the math kernel)."""
    return (
        not torch.compiler.is_compiling()
        and query.device.type == "cpu"
        and torch.is_grad_enabled()
        and bias.requires_grad
        and query.dtype in FUSED_CPU_TRAINING_DTYPES
        and torch.backends.cuda.flash_sdp_enabled()
    )


def attention_mask(bias: torch.Tensor, key_padding: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """The additive mask of SDPA: ``(1, heads, N, N)`` bias, or with ``key_padding`` ``(nW, 1, 1, N)`` the
    per-window ``bias + padding`` repeated for every image, ``(B * nW, heads, N, N)``."""
    if key_padding is None:
        return bias.unsqueeze(0)
    return (bias + key_padding).repeat(batch_size, 1, 1, 1)


#: ``log2(e)``, so that ``exp(x) = exp2(x * LOG2_E)``.
LOG2_E = math.log2(math.e)


def scaled_contiguous(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor * factor`` as a new contiguous tensor, in one pass: the batched products then copy nothing."""
    return torch.mul(tensor, factor, out=torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device))


def contiguous_operands(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, key_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Q * scale`` and (where ``key_scale != 1``) ``K * key_scale`` as new contiguous tensors (one pass each), the
    rest contiguous: the batched products then copy nothing."""
    key = key.contiguous() if key_scale == 1.0 else scaled_contiguous(key, key_scale)
    return scaled_contiguous(query, scale), key, value.contiguous()


def softmax_gradient_(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``dS = P * (dP - rowsum(P * dP))``, the gradient of the scores of ``P = softmax(S)``, written over ``dP``."""
    return torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, probs.dtype, grad_input=grad_probs)


def window_scores(
    scaled_query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, key_padding: torch.Tensor | None
) -> torch.Tensor:
    """``S = Q K^T * scale + B`` (plus ``-inf`` on padded keys), ``(B * nW, heads, N, N)``, from ``Q * scale``."""
    scores = torch.matmul(scaled_query, key.transpose(-2, -1)).add_(bias)
    if key_padding is not None:
        scores.unflatten(0, (-1, key_padding.shape[0])).add_(key_padding)
    return scores


class BiasedWindowAttention(torch.autograd.Function):
    """``softmax(Q K^T * scale + B + padding) V`` with gradients for ``Q``, ``K``, ``V`` and ``B`` (see module).

    Differentiable once: a backward with ``create_graph=True`` raises a ``RuntimeError`` that names the fix
    (``attention_backend("_native_math")``).

    ``query``, ``key``, ``value``: ``(B * nW, heads, N, head_dim)``; ``bias``: ``(heads, N, N)``; ``key_padding``:
    ``(nW, 1, 1, N)`` or ``None``.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, key_padding, scale):
        ctx.scale = scale
        ctx.keeps_probabilities = query.shape[-2] <= query.shape[-1]
        if ctx.keeps_probabilities:
            query, key, value = contiguous_operands(query, key, value, scale)
            scores = window_scores(query, key, bias, key_padding)
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            ctx.save_for_backward(query, key, value, probs)
            return torch.matmul(probs, value)
        batch_size = query.shape[0] // (1 if key_padding is None else key_padding.shape[0])
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=attention_mask(bias, key_padding, batch_size), scale=scale
        )
        ctx.save_for_backward(query, key, value, bias, key_padding, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: this backward would itself be differentiated
            raise RuntimeError(
                "DiffiT's CPU training attention can be differentiated once, but this backward records a graph "
                "(create_graph=True). For a double backward, run the step under diffusers' "
                "`attention_backend('_native_math')`."
            )
        grad_out = grad_out.contiguous()
        if ctx.keeps_probabilities:
            query, key, value, probs = ctx.saved_tensors  # query holds Q * scale
            key_scale = 1.0
        else:
            query, key, value, bias, key_padding, logsumexp = ctx.saved_tensors
            # P = exp2((S - lse) log2 e), log2 e taken into the copy of K (the padding's 0 and -inf need none).
            key_scale = LOG2_E
            query, key, value = contiguous_operands(query, key, value, ctx.scale, key_scale)
            log2_scores = window_scores(query, key, bias * key_scale, key_padding)
            probs = log2_scores.sub_(logsumexp.unsqueeze(-1) * key_scale).exp2_()
        grad_value = torch.matmul(probs.transpose(-2, -1), grad_out)
        grad_scores = softmax_gradient_(torch.matmul(grad_out, value.transpose(-2, -1)), probs)
        grad_query = torch.matmul(grad_scores, key).mul_(ctx.scale / key_scale)
        grad_key = torch.matmul(grad_scores.transpose(-2, -1), query)
        grad_bias = grad_scores.sum(0) if ctx.needs_input_grad[3] else None
        return grad_query, grad_key, grad_value, grad_bias, None, None


def biased_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 6 over windows, in the layout of ``dispatch_attention_fn``.

    Args:
        query: ``(B * nW, N, heads, head_dim)``, the windows of one image contiguous.
        key: like ``query``.
        value: like ``query``.
        bias: ``(heads, N, N)``, the same for every window.
        scale: the factor of ``Q K^T``.
        key_padding: ``(nW, 1, 1, N)``, ``0`` on real keys and ``-inf`` on padding, per window of an image.

    Returns:
        ``(B * nW, N, heads, head_dim)``.
    """
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    return BiasedWindowAttention.apply(query, key, value, bias, key_padding, scale).transpose(1, 2)
