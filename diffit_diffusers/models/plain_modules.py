"""Whether calling a module runs exactly its class's own ``forward``, so a fast path may compute it another way."""

from __future__ import annotations

from torch import nn


def runs_own_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``True`` if ``module`` is an instance of exactly ``cls`` (no subclass, such as a PEFT or quantized layer), has
    no module or global forward or backward hooks and no replaced ``forward`` (accelerate's and diffusers' hooks
    replace it)."""
    hooks = nn.modules.module
    return (
        type(module) is cls
        and "forward" not in vars(module)
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
        and not (hooks._global_backward_hooks or hooks._global_backward_pre_hooks)
    )
