"""Where datasets come from: telling local paths from Hub ids, and picking a split (shared by training and
evaluation)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def looks_like_local_path(source: str, suffixes: Iterable[str] = ()) -> bool:
    """Whether ``source`` is written as a local path rather than a Hub id such as ``user/name``: absolute,
    relative (``./``, ``~``), nested deeper than ``user/name``, or ending in one of ``suffixes``. A missing local
    path can then be reported as a missing file instead of a failed download."""
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or Path(source).suffix.lower() in set(suffixes)
    )


def select_split(dataset_dict: Mapping[str, Any], split: str, source: str) -> Any:
    """``dataset_dict[split]``, or a ``ValueError`` naming ``source`` and the splits it has."""
    if split not in dataset_dict:
        raise ValueError(f"{source} has no split {split!r}; available splits: {sorted(dataset_dict)}.")
    return dataset_dict[split]
