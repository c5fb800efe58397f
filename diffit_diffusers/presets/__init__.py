"""Named model configurations shipped with the package (one ``config.json`` per preset folder)."""

from __future__ import annotations

import json
import re
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
    """Adds ``from_preset`` to a diffusers ``ConfigMixin`` model."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Build a randomly initialised model from a shipped preset; keyword arguments override config entries."""
        config = load_preset_config(name, cls.__name__)
        config.update(overrides)
        return cls.from_config(config)
