"""Reading image collections (folders, ``.npz`` batches, local or Hub datasets) and computing their statistics."""

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..dataset_sources import center_crop_box, looks_like_local_path, open_dataset, resize_shorter_side
from .feature_extractors import FeatureExtractor
from .statistics import FeatureReservoir, FeatureStatistics, frechet_distance_metric, validate_features


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Array that holds the images in `.npz` sample/reference batches (the ADM convention of `np.savez(path, images)`).
NPZ_IMAGES_KEY = "arr_0"
_NPZ_ROWS_PER_READ = 256


def _open_image(value: Any, description: str) -> Image.Image:
    """Decodes the image representations found in datasets and ``.npz`` files into an RGB PIL image."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path") is not None:
            image = Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (np.ndarray, torch.Tensor)):
            array = np.asarray(value)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise ValueError(
                    f"{description}: arrays must be uint8 of shape (H, W) or (H, W, C), got {array.dtype} "
                    f"{array.shape}."
                )
            image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        else:
            raise TypeError(f"{description}: cannot read an image from a value of type {type(value).__name__}.")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{description}: cannot decode the image ({error}).") from error


def _image_to_tensor(image: Image.Image, resolution: Optional[int]) -> torch.Tensor:
    if resolution is not None and image.size != (resolution, resolution):
        image = resize_shorter_side(image, resolution)
        image = image.crop(center_crop_box(*image.size, resolution))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _iterate_folder_images(folder: Path) -> Iterator[Path]:
    yield from sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def _iterate_npz_images(path: Path) -> Iterator[np.ndarray]:
    """Streams the uint8 images ``(N, H, W[, C])`` stored as ``arr_0`` of an ``.npz`` without loading the whole
    array."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a readable .npz file ({error}).") from error
    with archive:
        member = f"{NPZ_IMAGES_KEY}.npy"
        if member not in archive.namelist():
            names = sorted(name.removesuffix(".npy") for name in archive.namelist())
            raise ValueError(
                f"{path} has no `{NPZ_IMAGES_KEY}` image array (found {names}). An .npz source must hold images as "
                f"`{NPZ_IMAGES_KEY}` (N, H, W, C) uint8, or precomputed statistics `mu` and `sigma`."
            )
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"{path}: unsupported .npy format version {version} for `{NPZ_IMAGES_KEY}`.")
            if fortran_order or dtype != np.uint8 or len(shape) not in (3, 4):
                raise ValueError(
                    f"{path}: `{NPZ_IMAGES_KEY}` must be a C-ordered uint8 array (N, H, W[, C]), got {dtype} {shape}."
                )
            row_bytes = math.prod(shape[1:])
            for start in range(0, shape[0], _NPZ_ROWS_PER_READ):
                rows = min(_NPZ_ROWS_PER_READ, shape[0] - start)
                data = stream.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise ValueError(f"{path}: `{NPZ_IMAGES_KEY}` is truncated after {start} images.")
                yield from np.frombuffer(data, dtype=np.uint8).reshape((rows, *shape[1:]))


def _iterate_dataset_images(dataset, image_column: str, source: str) -> Iterator[Any]:
    column_names = dataset.column_names
    if column_names is None:
        # Streaming datasets may only know their columns once the first example is read.
        return _read_column(dataset, image_column, source)
    if image_column not in column_names:
        raise ValueError(
            f"{source} has no column {image_column!r}; its columns are {column_names}. Set `image_column`."
        )
    return _read_column(dataset.select_columns([image_column]), image_column, source)


def _read_column(dataset, image_column: str, source: str) -> Iterator[Any]:
    for example in dataset:
        if image_column not in example:
            raise ValueError(f"{source} has no column {image_column!r}; found {sorted(example)}. Set `image_column`.")
        yield example[image_column]


def _iterate_source_images(
    source: Union[str, os.PathLike], image_column: str, split: str, streaming: bool
) -> Iterator[Any]:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        return _iterate_npz_images(path)
    if path.is_dir() and any(file.suffix.lower() in IMAGE_EXTENSIONS for file in path.rglob("*")):
        if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return _iterate_folder_images(path)
    source = os.fspath(source)
    if not path.exists() and looks_like_local_path(source, (".npz", *IMAGE_EXTENSIONS)):
        raise FileNotFoundError(f"{source!r} does not exist.")
    dataset = open_dataset(source, split=split, streaming=streaming)
    return _iterate_dataset_images(dataset, image_column, repr(source))


def _npz_has_statistics(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz file.")
    with zipfile.ZipFile(path) as archive:
        return {"mu.npy", "sigma.npy"} <= set(archive.namelist())


def _stack_images(images: list) -> torch.Tensor:
    sizes = {tuple(image.shape[1:]) for image in images}
    if len(sizes) > 1:
        raise ValueError(
            f"Images have different sizes {sorted(sizes)}; pass `resolution=` to resize and centre-crop them."
        )
    return torch.stack(images)


def iterate_image_batches(
    source: Union[str, os.PathLike],
    *,
    image_column: str = "image",
    split: str = "train",
    streaming: bool = False,
    batch_size: int = 64,
    max_samples: Optional[int] = None,
    resolution: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """
    Yields the images of a collection as uint8 RGB batches ``(B, 3, H, W)``, reading one batch at a time.

    ``source`` may be:

    - an ``.npz`` file holding ``arr_0`` uint8 images ``(N, H, W[, C])`` (ADM sample/reference batches), streamed from
      disk;
    - a folder of image files (searched recursively, sorted by path);
    - a local data file (``.parquet``, ``.arrow``, ``.csv``, ``.json(l)``), a ``save_to_disk`` folder, or any folder
      that ``datasets.load_dataset`` understands;
    - a dataset id on the Hugging Face Hub, loaded with
      ``datasets.load_dataset(source, split=split, streaming=streaming)``.

    Args:
        source (str or os.PathLike): the image collection, one of the kinds above.
        image_column (str): dataset column holding the images.
        split (str): dataset split.
        streaming (bool): stream Hub/local datasets instead of downloading/preparing them.
        batch_size (int): images per batch.
        max_samples (int, optional): stop after this many images.
        resolution (int, optional): scale the shorter side to this size and crop the centre square; required
            when the images have different sizes.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples!r}.")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"`resolution` must be a positive integer or None, got {resolution!r}.")
    images = _iterate_source_images(source, image_column, split, streaming)
    return _batch_images(images, os.fspath(source), batch_size, max_samples, resolution)


def _batch_images(
    images: Iterator[Any], source: str, batch_size: int, max_samples: Optional[int], resolution: Optional[int]
) -> Iterator[torch.Tensor]:
    batch, num_yielded = [], 0
    for index, value in enumerate(images):
        if max_samples is not None and num_yielded + len(batch) >= max_samples:
            break
        description = str(value) if isinstance(value, Path) else f"{source} image {index}"
        batch.append(_image_to_tensor(_open_image(value, description), resolution))
        if len(batch) == batch_size:
            yield _stack_images(batch)
            num_yielded += len(batch)
            batch = []
    if batch:
        yield _stack_images(batch)


def compute_reference_statistics(
    source: Union[str, os.PathLike],
    extractor: FeatureExtractor,
    *,
    image_column: str = "image",
    split: str = "train",
    streaming: bool = False,
    batch_size: int = 64,
    max_samples: Optional[int] = None,
    resolution: Optional[int] = None,
    feature_reservoir: Optional[FeatureReservoir] = None,
    show_progress: bool = False,
) -> FeatureStatistics:
    """
    Feature statistics of a reference image collection, computed batch by batch.

    An ``.npz`` file holding ``mu`` and ``sigma`` is loaded as precomputed statistics (see ``FeatureStatistics.load``)
    unless ``feature_reservoir`` asks for the features, in which case its ``arr_0`` images are evaluated. Every other
    source is read with ``iterate_image_batches`` (see there for the accepted kinds and the other arguments).

    Args:
        extractor (FeatureExtractor): maps the images to features.
        feature_reservoir (FeatureReservoir, optional): also receives the features, e.g. to keep a random
            subset of real features for precision/recall and KID.
        show_progress (bool): show a progress bar.

    Returns:
        ``FeatureStatistics`` of the features.
    """
    path = Path(source).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file() and feature_reservoir is None and _npz_has_statistics(path):
        return FeatureStatistics.load(path)
    metric = None
    batches = iterate_image_batches(
        source,
        image_column=image_column,
        split=split,
        streaming=streaming,
        batch_size=batch_size,
        max_samples=max_samples,
        resolution=resolution,
    )
    with tqdm(total=max_samples, unit="img", desc="Reference features", disable=not show_progress) as progress:
        for images in batches:
            features = validate_features(extractor(images), None if metric is None else metric.inception.num_features)
            if metric is None:
                metric = frechet_distance_metric(features.shape[1], features.device)
            metric.update(features, real=True)
            if feature_reservoir is not None:
                feature_reservoir.add(features)
            progress.update(images.shape[0])
    if metric is None:
        raise ValueError(f"{os.fspath(source)} contains no images.")
    return FeatureStatistics.from_metric(metric)
