"""Where datasets come from and how their images are sized, shared by training and evaluation: telling local paths
from Hub ids, opening a dataset source, picking a split, and the resize-then-crop of images."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import PIL.Image
from huggingface_hub import constants as hub_constants


# Local data files a dataset source may be, with the `datasets` builder that reads each kind.
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


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


def open_dataset(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """Opens split ``split`` of a dataset source with `datasets`.

    Args:
        source (str): a local data file (see ``DATA_FILE_BUILDERS``), a ``save_to_disk`` folder, a folder that
            ``datasets.load_dataset`` reads, or a Hub dataset id.
        split (str): the split to open.
        config_name (str, optional): the configuration of a Hub or folder dataset.
        streaming (bool): return a streamed ``datasets.IterableDataset`` (``save_to_disk`` folders load map-style).
        cache_dir (str, optional): the `datasets` cache folder.

    Returns:
        A ``datasets.Dataset`` or ``datasets.IterableDataset``.
    """
    import datasets

    path = Path(source).expanduser()
    load_kwargs = {"split": split, "streaming": streaming, "cache_dir": cache_dir}
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Unsupported data file {source!r}; expected a {', '.join(DATA_FILE_BUILDERS)} file, a dataset folder "
                "or a Hub dataset id."
            )
        return datasets.load_dataset(builder, data_files={split: str(path)}, **load_kwargs)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = select_split(dataset, split, f"dataset {source!r}")
            return dataset
        return datasets.load_dataset(str(path), config_name, **load_kwargs)
    if looks_like_local_path(source, DATA_FILE_BUILDERS):
        raise FileNotFoundError(
            f"{source!r} looks like a local path but nothing exists at {str(path.resolve())!r}; expected a "
            f"{', '.join(DATA_FILE_BUILDERS)} file or a dataset folder."
        )
    try:
        return datasets.load_dataset(source, config_name, **load_kwargs)
    except (ConnectionError, FileNotFoundError) as error:
        if datasets.config.HF_HUB_OFFLINE or hub_constants.HF_HUB_OFFLINE:
            raise ValueError(
                f"Cannot load the Hub dataset {source!r}: the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the "
                "local cache; run once online to cache it, or pass a local dataset path."
            ) from error
        if isinstance(error, ConnectionError):
            raise
        raise FileNotFoundError(
            f"{source!r} is neither an existing local path nor a dataset reachable on the Hub ({error})."
        ) from error


def resize_shorter_side(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """Scales ``image`` (bicubic) so that its shorter side is ``resolution``; the longer side is rounded and at
    least ``resolution``."""
    width, height = image.size
    scale = resolution / min(width, height)
    if scale == 1:
        return image
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, PIL.Image.Resampling.BICUBIC)


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of the centred ``resolution`` square in a ``width x height`` image."""
    left, top = round((width - resolution) / 2), round((height - resolution) / 2)
    return left, top, left + resolution, top + resolution
