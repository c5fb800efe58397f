"""Windowed attention with a learned additive bias, trained on CPU through PyTorch's fused kernel (DiffiT Eq. 6).

PyTorch's CPU ``scaled_dot_product_attention`` runs its fused (flash) kernel only while the mask needs no gradient.
DiffiT's relative position bias does need one in training, which sends SDPA to its math kernel: the probabilities of
every window are materialised, saved and back-propagated op by op. ``biased_window_attention`` keeps the fused
kernel for the forward, which saves only the output ``O`` and the log-sum-exp ``lse`` of every score row, and its
backward recomputes the probabilities once and returns the bias gradient with the others:

    P  = exp(Q K^T * scale + B - lse)                        (the forward's softmax, Eq. 6)
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O))
    dQ = dS K * scale,   dK = dS^T Q * scale,   dB = sum of dS over all windows

Only the fused kernel's tensors are kept (no ``(windows, heads, N, N)`` probabilities), so training also needs less
memory than through the math kernel.
"""

from __future__ import annotations

import torch


#: Dtypes whose fused CPU kernel and recomputed backward agree with the math kernel to the dtype's rounding.
FUSED_CPU_TRAINING_DTYPES = (torch.float32, torch.float64)


def fused_cpu_training_applies(query: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``biased_window_attention`` should replace SDPA: a CPU forward whose bias needs a gradient, in a
    dtype of ``FUSED_CPU_TRAINING_DTYPES``, with the fused kernel allowed (``torch.nn.attention.sdpa_kernel``) and
    not under ``torch.compile`` (which traces SDPA itself)."""
    return (
        not torch.compiler.is_compiling()
        and query.device.type == "cpu"
        and torch.is_grad_enabled()
        and bias.requires_grad
        and query.dtype in FUSED_CPU_TRAINING_DTYPES
        and torch.backends.cuda.flash_sdp_enabled()
    )


def attention_mask(bias: torch.Tensor, key_padding: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """The additive mask of the fused kernel: ``(1, heads, N, N)`` bias, or with ``key_padding`` ``(nW, 1, 1, N)``
    the per-window ``bias + padding`` repeated for every image, ``(B * nW, heads, N, N)``."""
    if key_padding is None:
        return bias.unsqueeze(0)
    return (bias + key_padding).repeat(batch_size, 1, 1, 1)


class BiasedWindowAttention(torch.autograd.Function):
    """``softmax(Q K^T * scale + B + padding) V`` with gradients for ``Q``, ``K``, ``V`` and ``B`` (see module)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, key_padding, scale):
        batch_size = query.shape[0] // (1 if key_padding is None else key_padding.shape[0])
        mask = attention_mask(bias.detach(), key_padding, batch_size)
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )
        ctx.save_for_backward(query, key, value, bias, key_padding, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias, key_padding, out, logsumexp = ctx.saved_tensors
        scale = ctx.scale
        # Contiguous operands once, so that none of the batched products below copies its own.
        query = torch.mul(query, scale, out=torch.empty(query.shape, dtype=query.dtype, device=query.device))
        key, value, grad_out = (t.contiguous() for t in (key, value, grad_out))
        scores = torch.matmul(query, key.transpose(-2, -1)).add_(bias)  # (B*nW, heads, N, N)
        if key_padding is not None:
            scores.unflatten(0, (-1, key_padding.shape[0])).add_(key_padding)
        probs = scores.sub_(logsumexp.unsqueeze(-1)).exp_()  # P, recomputed from the forward's lse
        grad_value = torch.matmul(probs.transpose(-2, -1), grad_out)
        row_terms = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        grad_scores = probs.mul_(torch.matmul(grad_out, value.transpose(-2, -1)).sub_(row_terms))  # dS
        grad_query = torch.matmul(grad_scores, key).mul_(scale)
        grad_key = torch.matmul(grad_scores.transpose(-2, -1), query)  # query holds Q * scale
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
        query, key, value: ``(B * nW, N, heads, head_dim)``, the windows of one image contiguous.
        bias: ``(heads, N, N)``, the same for every window.
        scale: the factor of ``Q K^T``.
        key_padding: ``(nW, 1, 1, N)``, ``0`` on real keys and ``-inf`` on padding, per window of an image.

    Returns:
        ``(B * nW, N, heads, head_dim)``.
    """
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    return BiasedWindowAttention.apply(query, key, value, bias, key_padding, scale).transpose(1, 2)
