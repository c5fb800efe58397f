"""Checks shared by the model test files."""

import torch


def assert_checkpointing_keeps_gradients(model: torch.nn.Module, *inputs) -> None:
    """Enable gradient checkpointing on ``model`` and assert every parameter's gradient of a fixed loss is unchanged."""

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(*inputs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
