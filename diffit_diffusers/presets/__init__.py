"""Named model configurations shipped with the package (one ``config.json`` per preset folder)."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


PRESETS_DIR = Path(__file__).parent


def _folder_name(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def available_presets(class_name: str | None = None) -> list[str]:
    """Names of the shipped presets, optionally only those for the model class ``class_name``."""
    names = []
    for config_file in sorted(PRESETS_DIR.glob("*/config.json")):
        config = json.loads(config_file.read_text())
        if class_name is None or config["_class_name"] == class_name:
            names.append(config["_preset_name"])
    return names


def load_preset_config(name: str, class_name: str | None = None) -> dict[str, Any]:
    """The config dict of preset ``name`` (case-insensitive; ``"DiffiT-XL/2"`` and ``"diffit-xl-2"`` both work)."""
    config_file = PRESETS_DIR / _folder_name(name) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(available_presets(class_name))}.")
    config = json.loads(config_file.read_text())
    if class_name is not None and config["_class_name"] != class_name:
        raise ValueError(
            f"Preset {name!r} configures a {config['_class_name']}, not a {class_name}. Presets for {class_name}: "
            f"{', '.join(available_presets(class_name))}."
        )
    return config


class PresetMixin:
    """Adds ``from_preset`` to a diffusers ``ConfigMixin`` model, and refuses configs saved by another model class.

    List it before ``ConfigMixin`` among the bases, so that its ``from_config`` (which ``from_pretrained`` calls)
    runs first.
    """

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build a randomly initialised model from a shipped preset; keyword arguments override config entries.

        Raises:
            ValueError: for an unknown preset or a keyword argument that is not a config field of the model.
        """
        config = load_preset_config(name, cls.__name__)
        allowed = sorted(inspect.signature(cls.__init__).parameters.keys() - {"self"})
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_preset got unknown config field(s) {unknown}; allowed fields: {allowed}."
            )
        config.update(overrides)
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``ConfigMixin.from_config``, after checking that ``config`` belongs to this model class."""
        from ..models.config_validation import check_config_class

        check_config_class(config, cls)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
