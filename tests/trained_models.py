"""Tiny DiffiT models genuinely trained on scikit-learn's digits, shared by every test that must show that samples
*mean* something (schedulers, guidance, caching, LoRA, ...), where random weights would prove nothing.

Use the pytest fixtures from ``conftest.py``:

- ``trained_digits_dir``: the folder of a ``DiffiTPipeline`` trained with the default (EDM) objective;
- ``trained_digits_pipeline``: that pipeline freshly loaded for one test (swap its scheduler freely);
- ``trained_digits_dir_for(objective)``: the same recipe with another objective (``"epsilon"``, ...).

Judge samples with ``diffit_diffusers.training.demo.digit_accuracy(images, labels)`` (images ``(N, 8, 8)`` in
[0, 1]); the EDM model's guided samples (scale 2, 25 EDM steps) score about 1.0 against 0.1 for chance.

The recipe is ``diffit_diffusers.training.demo.small_digits_config``: the ``digits-8`` U-Net on the 8x8 digits,
800 steps through the real trainer (about 1.5 min on one core). It is trained once per test session: the folder
lives under the session's temp root, which all pytest-xdist workers share, and a file lock makes the other workers
wait for the first. Set ``DIFFIT_TRAINED_MODELS_DIR`` to keep the models across sessions; the folder name carries
a hash of the training config, so a changed recipe trains afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from diffit_diffusers.training import train
from diffit_diffusers.training.demo import small_digits_config


CACHE_ENV = "DIFFIT_TRAINED_MODELS_DIR"


def trained_digits_folder(root: Path, objective: str = "edm") -> Path:
    """The pipeline folder of the digits model trained with ``objective``, training it under ``root`` unless a
    finished one is there already."""
    root = Path(os.environ.get(CACHE_ENV, root))
    recipe = dataclasses.asdict(small_digits_config("", objective))
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = root / f"digits-{objective}-{digest}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "model_index.json").is_file():
            train(small_digits_config(str(folder), objective))
    return folder
