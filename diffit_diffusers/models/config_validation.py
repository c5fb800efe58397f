"""Checks that turn a bad model configuration into one clear ``ValueError`` before any layer is built."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


# The activations diffusers' ``FeedForward`` builds.
ACTIVATION_FUNCTIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu")


def validate_config(
    model_name: str,
    *,
    positive: Mapping[str, int | float | Sequence[int] | None],
    activation_fn: str,
    sincos_width: tuple[str, int] | None = None,
) -> None:
    """Raises a ``ValueError`` naming the first bad field of a model configuration.

    Args:
        model_name: the model class, named in the messages.
        positive: fields that must be positive numbers (integers stay integers); a sequence must hold positive
            integers and ``None`` means "not set".
        activation_fn: must be one of ``ACTIVATION_FUNCTIONS``.
        sincos_width: ``(description, width)`` of a hidden width that a 2D sin-cos position embedding takes, which
            must be divisible by 4 (a sine and a cosine for each of the two axes).
    """
    for name, value in positive.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(_is_positive(item, integer=not isinstance(item, float)) for item in values):
            if isinstance(value, (list, tuple)):
                kind = "positive integers"
            else:
                kind = "a positive number" if isinstance(value, float) else "a positive integer"
            raise ValueError(f"{model_name}: `{name}` must be {kind}, got {value!r}.")
    if activation_fn not in ACTIVATION_FUNCTIONS:
        raise ValueError(
            f"{model_name}: unknown `activation_fn` {activation_fn!r}; use one of {', '.join(ACTIVATION_FUNCTIONS)}."
        )
    if sincos_width is not None and sincos_width[1] % 4:
        description, width = sincos_width
        raise ValueError(
            f"{model_name}: the hidden width {description} = {width} must be divisible by 4 for the 2D sin-cos "
            "position embedding (a sine and a cosine per axis)."
        )


def _is_positive(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int) and value > 0
    return isinstance(value, (int, float)) and value > 0


def check_config_class(config: Mapping[str, Any] | None, cls: type) -> None:
    """Raises a ``ValueError`` when ``config`` was saved by another model class than ``cls`` (or a base of it),
    naming the class to load it with."""
    saved_class = (config or {}).get("_class_name")
    if saved_class is None or saved_class in {base.__name__ for base in cls.__mro__}:
        return
    raise ValueError(
        f"This config was saved by {saved_class}, not {cls.__name__}: load it with {saved_class}.from_pretrained "
        f"(or {saved_class}.from_config)."
    )
