"""Training data for DiffiT: dataset sources, PIL + torch image transforms and exactly resumable batch loading.

Sources are Hugging Face `datasets`: a Hub dataset, a local dataset folder or data file (parquet, arrow, a folder
written by `save_to_disk`), an image folder (class sub-folders become labels) or the built-in offline `"digits"`
dataset. Examples are dicts `{"pixel_values": ByteTensor (C, H, W), "class_labels": LongTensor ()}` (labels only
for class-conditional training): images cross from DataLoader workers to the training process as 8-bit pixels, a
quarter of the bytes of float32, and [`normalize_pixels`][diffit_diffusers.training.normalize_pixels] turns a batch
into floats in [-1, 1] where it trains.

Images are decoded lazily, so unreadable ones (bytes PIL cannot decode, truncated or missing files) are skipped,
counted in `skipped_images` and reported through `logging` and an optional callback. [`ResumableLoader`][diffit_diffusers.training.ResumableLoader] turns a
dataset into an infinite stream of batches, prepared by accelerate, whose position can be saved and restored exactly.
"""

import copy
import functools
import logging
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate.data_loader import prepare_data_loader
from datasets.distributed import split_dataset_by_node
from torch.multiprocessing.reductions import StorageWeakRef

from ..dataset_sources import center_crop_box, open_dataset, resize_shorter_side
from ..utils import seeded_generator


logger = logging.getLogger(__name__)


DIGITS_DATASET_NAME = "digits"
DIGITS_NUM_CLASSES = 10

# A map-style dataset is split into this many shards (at most one per example) when it is streamed.
_STREAMING_NUM_SHARDS = 16
# Shards read in turn to fill the shuffle blocks of a stream.
_MAX_INTERLEAVED_SHARDS = 10
# What PIL and `datasets` raise for undecodable bytes, truncated files, missing files or empty image cells.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, PIL.Image.DecompressionBombError)
_RAW_IMAGE_FEATURE = datasets.Image(decode=False)
_IMAGE_DECODER = datasets.Image()

UnreadableImageCallback = Callable[[str, Exception], None]


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with the `--help` text (and argparse settings such as `choices`) its flag shows."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class DataConfig:
    """Where the training images come from and how they are turned into tensors.

    Args:
        dataset_name (`str`, *optional*):
            A Hub dataset id, a local dataset folder or data file (`.parquet`, `.arrow`, a `save_to_disk` folder),
            or `"digits"` for scikit-learn's bundled 8x8 handwritten digits (offline, 1797 images, labels 0-9).
        dataset_config_name (`str`, *optional*): The configuration of a Hub dataset.
        split (`str`, defaults to `"train"`): The split to train on.
        train_data_dir (`str`, *optional*):
            An image folder, read with the `datasets` "imagefolder" builder; class sub-folders become labels.
            Exactly one of `dataset_name` and `train_data_dir` must be given.
        image_column (`str`, defaults to `"image"`):
            The column holding the images. When left at `"image"` and no such column exists, the single column
            with an `Image` feature is used.
        label_column (`str`, *optional*):
            The column holding class labels; `None` trains unconditionally. A `ClassLabel` feature gives the
            class names; other columns are class-encoded (map-style datasets only).
        resolution (`int`, defaults to 32): Side of the square training images.
        center_crop (`bool`, defaults to `True`): Center crop after resizing; `False` crops at a random place.
        random_flip (`bool`, defaults to `False`): Flip images horizontally with probability 0.5.
        num_channels (`int`, defaults to 3): 3 converts images to RGB, 1 to grayscale.
        streaming (`bool`, defaults to `False`): Stream the dataset instead of loading it into the local cache.
        shuffle_buffer_size (`int`, defaults to 1000): Examples shuffled together when streaming.
        seed (`int`, defaults to 0): Seed of the shuffling and of the random crops and flips.
        max_train_samples (`int`, *optional*):
            Train on at most this many examples: a seeded random subset for map-style datasets, the first ones of
            the stream when streaming.
        cache_dir (`str`, *optional*): The `datasets` cache folder.
        dataloader_num_workers (`int`, defaults to 0):
            Worker processes of the `DataLoader` that decode and transform images (0 = in the training process).
        latents_dataset (`str`, *optional*):
            Cached VAE latents written by `python -m diffit_diffusers.training.precompute_latents` (a folder or a
            Hub dataset id), instead of images: training then runs no VAE encoder.
    """

    dataset_name: Optional[str] = _option(None, "Hub dataset id, local dataset path, or 'digits' (built in, offline)")
    dataset_config_name: Optional[str] = _option(None, "configuration of a Hub dataset")
    split: str = _option("train", "dataset split to train on")
    train_data_dir: Optional[str] = _option(None, "image folder; class sub-folders become labels")
    image_column: str = _option("image", "column holding the images")
    label_column: Optional[str] = _option(None, "column holding class labels; omit for unconditional training")
    resolution: int = _option(32, "side of the square training images (pixels)")
    center_crop: bool = _option(True, "center crop after resizing (else a random crop)")
    random_flip: bool = _option(False, "random horizontal flips")
    num_channels: int = _option(3, "3 = RGB, 1 = grayscale")
    streaming: bool = _option(False, "stream the dataset instead of downloading it")
    shuffle_buffer_size: int = _option(1000, "examples shuffled together (one block) when streaming")
    seed: int = _option(0, "seed of the run: shuffling, crops and flips, initialisation and noise")
    max_train_samples: Optional[int] = _option(None, "train on at most this many examples")
    cache_dir: Optional[str] = _option(None, "datasets/Hub cache folder")
    dataloader_num_workers: int = _option(0, "DataLoader worker processes decoding and transforming images")
    latents_dataset: Optional[str] = _option(
        None, "cached VAE latents (folder or Hub dataset) from `python -m diffit_diffusers.training.precompute_latents`"
    )

    def __post_init__(self):
        sources = {
            name: getattr(self, name)
            for name in ("dataset_name", "train_data_dir", "latents_dataset")
            if getattr(self, name) is not None
        }
        if not sources:
            raise ValueError(
                "No training data given: set `dataset_name` (a Hub dataset id, a local dataset path or "
                f"'{DIGITS_DATASET_NAME}'), `train_data_dir` (an image folder) or `latents_dataset` (cached latents)."
            )
        if len(sources) > 1:
            given = " and ".join(f"`{name}` ({value!r})" for name, value in sources.items())
            raise ValueError(f"Both {given} are set; set only one of them.")
        for name in ("resolution", "shuffle_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"`max_train_samples` must be a positive integer or None, got {self.max_train_samples}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(f"`dataloader_num_workers` must be >= 0, got {self.dataloader_num_workers}.")
        if self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed}.")
        _image_mode(self.num_channels)


def _image_mode(num_channels: int) -> str:
    modes = {1: "L", 3: "RGB"}
    if num_channels not in modes:
        raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    return modes[num_channels]


class ImageTransform:
    """Turns a PIL image into a uint8 tensor (C, H, W) with `H = W = resolution` (see `normalize_pixels`).

    The image is converted to RGB or grayscale, resized (bicubic) so that its shorter side equals `resolution`,
    cropped to a square at the center or at a random place, and flipped horizontally with probability 0.5 when
    `random_flip` is set. Random choices are drawn from the `generator` passed to each call.
    """

    def __init__(self, resolution: int, num_channels: int = 3, center_crop: bool = True, random_flip: bool = False):
        if resolution < 1:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution}.")
        self.resolution = resolution
        self.mode = _image_mode(num_channels)
        self.center_crop = center_crop
        self.random_flip = random_flip

    @classmethod
    def from_config(cls, config: DataConfig) -> "ImageTransform":
        return cls(config.resolution, config.num_channels, config.center_crop, config.random_flip)

    def __call__(self, image: PIL.Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        image = resize_shorter_side(image, self.resolution)
        width, height = image.size
        if self.center_crop:
            box = center_crop_box(width, height, self.resolution)
        else:
            left = int(torch.randint(0, width - self.resolution + 1, (), generator=generator))
            top = int(torch.randint(0, height - self.resolution + 1, (), generator=generator))
            box = (left, top, left + self.resolution, top + self.resolution)
        image = image.crop(box)
        if self.random_flip and float(torch.rand((), generator=generator)) < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
        return pixels.permute(2, 0, 1)


def _normalize_on_cpu(pixel_values: torch.Tensor) -> torch.Tensor:
    """`x / 127.5 - 1` in float32, the arithmetic every device's result must equal."""
    return pixel_values.float().div_(127.5).sub_(1.0)


@functools.lru_cache
def _pixel_levels(device: torch.device) -> torch.Tensor:
    """The float32 value of each of the 256 pixel levels, computed on the CPU, on `device`."""
    return _normalize_on_cpu(torch.arange(256, dtype=torch.uint8)).to(device)


def normalize_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Maps uint8 pixels `(..., C, H, W)` to float32 in [-1, 1] (`x / 127.5 - 1`), on the device they are on.

    The values are the same on every device: the CPU computes them; elsewhere they are looked up in the 256 levels
    computed on the CPU (a GPU divides by a Python number as a multiplication by its reciprocal, which would change
    111 of the 256 levels by one unit in the last place).
    """
    if pixel_values.dtype != torch.uint8:
        raise ValueError(f"`normalize_pixels` takes uint8 pixels, got {pixel_values.dtype}.")
    if pixel_values.device.type == "cpu":
        return _normalize_on_cpu(pixel_values)
    return _pixel_levels(pixel_values.device)[pixel_values.long()]


def load_digits_dataset(resolution: int = 8) -> datasets.Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images) as a `datasets.Dataset` with `image` and `label` columns.

    Pixel intensities 0..16 are scaled to 0..255 and the grayscale images are upsampled to `resolution` with
    bicubic interpolation, which draws smooth strokes; nearest-neighbour upsampling would instead turn every
    source pixel into a hard-edged block whose grid dominates what a model has to learn. Labels are a
    `ClassLabel` with names "0".."9".
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            f"The built-in '{DIGITS_DATASET_NAME}' dataset needs scikit-learn: `pip install scikit-learn`."
        ) from error
    if resolution < 1:
        raise ValueError(f"`resolution` must be a positive integer, got {resolution}.")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    size = (resolution, resolution)
    images = [PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.BICUBIC) for image in pixels]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(digit) for digit in range(DIGITS_NUM_CLASSES)]),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def _load_source(config: DataConfig) -> tuple[Union[datasets.Dataset, datasets.IterableDataset], str]:
    """Loads the configured dataset split; returns it with a name for messages."""
    load_kwargs = {"split": config.split, "cache_dir": config.cache_dir, "streaming": config.streaming}
    if config.train_data_dir is not None:
        folder = Path(config.train_data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"`train_data_dir` {str(folder)!r} is not an existing folder; expected a folder of images, "
                "optionally with one sub-folder per class."
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), **load_kwargs)
        return dataset, f"image folder {str(folder)!r}"

    name = config.dataset_name
    if name == DIGITS_DATASET_NAME:
        if config.split != "train":
            raise ValueError(f"The '{DIGITS_DATASET_NAME}' dataset only has a 'train' split, got {config.split!r}.")
        return load_digits_dataset(config.resolution), f"the built-in '{DIGITS_DATASET_NAME}' dataset"

    source_name = f"dataset {name!r}"
    return open_dataset(name, config_name=config.dataset_config_name, **load_kwargs), source_name


def _resolve_image_column(features: datasets.Features, image_column: str, source_name: str) -> str:
    if image_column in features:
        feature = features[image_column]
        if not isinstance(feature, datasets.Image) and getattr(feature, "dtype", None) not in (
            "binary",
            "large_binary",
            "string",
            "large_string",
        ):
            raise ValueError(
                f"Column {image_column!r} of {source_name} holds {feature}, not images (an Image feature, image "
                "bytes or image paths); set `image_column` to the column with the images."
            )
        return image_column
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column == DataConfig.image_column and len(image_columns) == 1:
        return image_columns[0]
    raise ValueError(
        f"Image column {image_column!r} not found in {source_name}; available columns: {list(features)}. "
        "Set `image_column` to one of them."
    )


def _prepare_columns(
    dataset: Union[datasets.Dataset, datasets.IterableDataset], config: DataConfig, source_name: str
) -> tuple[Union[datasets.Dataset, datasets.IterableDataset], str, Optional[list[str]]]:
    """Keeps the image (undecoded) and label columns; returns the dataset, image column and class names."""
    features = dataset.features
    if features is None:
        raise ValueError(
            f"The columns of {source_name} are unknown before reading it; use a dataset with declared features "
            "(parquet, arrow, an image folder or a Hub dataset with a dataset card) or turn off streaming."
        )
    image_column = _resolve_image_column(features, config.image_column, source_name)
    columns = [image_column]
    class_names = None
    label_column = config.label_column
    if label_column is not None:
        if label_column not in features:
            raise ValueError(
                f"Label column {label_column!r} not found in {source_name}; available columns: {list(features)}. "
                "Set `label_column` to one of them, or to None for unconditional training."
            )
        if not isinstance(features[label_column], datasets.ClassLabel):
            if isinstance(dataset, datasets.IterableDataset):
                raise ValueError(
                    f"Label column {label_column!r} of {source_name} is {features[label_column]}, not a ClassLabel; "
                    "streaming cannot list the classes up front. Turn off streaming or use a ClassLabel column."
                )
            dataset = dataset.class_encode_column(label_column)
        class_names = list(dataset.features[label_column].names)
        columns.append(label_column)
    dataset = dataset.select_columns(columns).cast_column(image_column, _RAW_IMAGE_FEATURE)
    return dataset, image_column, class_names


def decode_and_transform(
    cell: Any, transform: ImageTransform, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Decode one image cell of a `datasets` table (`{"bytes": ..., "path": ...}`, a path, or a PIL image) and turn
    it into a uint8 `(C, H, W)` tensor with `transform`; an unreadable image raises one of
    `UNREADABLE_IMAGE_ERRORS`. This is the per-image work the DataLoader workers do."""
    image = cell if isinstance(cell, PIL.Image.Image) else _IMAGE_DECODER.decode_example(
        {"path": cell, "bytes": None} if isinstance(cell, str) else cell
    )
    return transform(image, generator)


class _ImageExamples:
    """What map-style and streaming datasets share: decoding, transforms, labels and unreadable-image accounting.

    Attributes:
        num_classes (`int` or `None`): Number of classes, `None` for unconditional training.
        id2label (`dict[int, str]` or `None`): Class names by label id, `None` for unconditional training.
        skipped_images (`int`): Unreadable images skipped so far (in this process).
        source_name (`str`): The dataset or folder the examples come from, for messages.
        seed (`int`): Seed of the shuffling and of the random crops and flips.
        process_index, num_processes (`int`): The process this dataset serves, out of how many.
    """

    def __init__(
        self,
        *,
        image_column: str,
        label_column: Optional[str],
        class_names: Optional[list[str]],
        transform: ImageTransform,
        seed: int,
        source_name: str,
        process_index: int,
        num_processes: int,
        on_unreadable_image: Optional[UnreadableImageCallback],
    ):
        self.image_column = image_column
        self.label_column = label_column
        self.num_classes = None if class_names is None else len(class_names)
        self.id2label = None if class_names is None else dict(enumerate(class_names))
        self.transform = transform
        self.seed = seed
        self.source_name = source_name
        self.process_index = process_index
        self.num_processes = num_processes
        self.on_unreadable_image = on_unreadable_image
        self.skipped_images = 0

    def _make_example(
        self, row: dict[str, Any], generator: torch.Generator, where: str
    ) -> Optional[dict[str, torch.Tensor]]:
        """Turns one raw row into an example; returns `None` (after reporting it) when its image is unreadable."""
        try:
            example = self._example_values(row, generator)
        except UNREADABLE_IMAGE_ERRORS as error:
            self.skipped_images += 1
            cell = row.get(self.image_column)
            description = f"{where} ({cell['path']})" if isinstance(cell, dict) and cell.get("path") else where
            logger.warning(
                f"Skipping unreadable image {description} in column {self.image_column!r} of {self.source_name}: "
                f"{error} ({self.skipped_images} skipped so far)."
            )
            if self.on_unreadable_image is not None:
                self.on_unreadable_image(description, error)
            return None
        if self.label_column is not None:
            label = row[self.label_column]
            label = None if label is None else int(label)
            if label is None or not 0 <= label < self.num_classes:
                raise ValueError(
                    f"{where} of {self.source_name} has label {label!r} in column {self.label_column!r}, outside "
                    f"0..{self.num_classes - 1}; remove unlabeled rows or train unconditionally (label_column=None)."
                )
            example["class_labels"] = torch.tensor(label, dtype=torch.long)
        return example

    def _example_values(self, row: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"pixel_values": decode_and_transform(row[self.image_column], self.transform, generator)}

    def _no_usable_image_error(self) -> ValueError:
        share = f" for process {self.process_index} of {self.num_processes}" if self.num_processes > 1 else ""
        reason = (
            f"{self.skipped_images} unreadable image(s) skipped and none could be decoded"
            if self.skipped_images
            else "no examples reached this process (fewer examples or shards than processes?)"
        )
        return ValueError(f"No usable image in column {self.image_column!r} of {self.source_name}{share}: {reason}.")


class ImageDataset(_ImageExamples, torch.utils.data.Dataset):
    """Map-style training images: `dataset[i]` is `{"pixel_values": uint8 (C, H, W), "class_labels": ()}`.

    The whole dataset is visible to every process: [`ResumableLoader`][diffit_diffusers.training.ResumableLoader] has
    accelerate shard its batches over the processes. Random
    crops and flips depend only on `(seed, epoch, index)`, so they are reproducible with any number of workers;
    call `set_epoch` at each epoch. An unreadable image is skipped: its index is served by the next readable
    index (wrapping around), so batches stay full; it is counted once in `skipped_images`.
    """

    def __init__(self, hf_dataset: datasets.Dataset, **kwargs):
        super().__init__(**kwargs)
        self.hf_dataset = hf_dataset
        self.epoch = 0
        self._unreadable_indices: set[int] = set()

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The example at `index`, with the crops and flips of `epoch` when `key` is `(epoch, index)` (else of the
        epoch set with `set_epoch`)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"Index {index} out of range for a dataset of {len(self)} examples.")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._unreadable_indices:
                continue
            generator = seeded_generator(self.seed, epoch, candidate)
            example = self._make_example(self.hf_dataset[candidate], generator, f"row {candidate}")
            if example is not None:
                return example
            self._unreadable_indices.add(candidate)
        raise self._no_usable_image_error()


@contextmanager
def _without_buffer_refill_warning():
    """Silences `datasets`' warning that a restored shuffle buffer is refilled.

    The `datasets` shuffle below only orders and interleaves shards; its buffer holds a single example that is
    handed on at once, so nothing is lost on restore and the warning would be misleading.
    """

    def drop_refill_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Loading a state dict of a shuffle buffer")

    datasets_logger = logging.getLogger("datasets.iterable_dataset")
    datasets_logger.addFilter(drop_refill_warning)
    try:
        yield
    finally:
        datasets_logger.removeFilter(drop_refill_warning)


class StreamingImageDataset(_ImageExamples, torch.utils.data.IterableDataset):
    """Streamed training images for one process, shuffled in blocks and exactly resumable.

    `hf_stream` is the whole `datasets.IterableDataset` (shard order already shuffled with a fixed seed); each
    pass takes this process's share with `split_dataset_by_node`. Examples are shuffled in blocks of
    `shuffle_buffer_size`: a block is read, permuted with a generator seeded by `(seed, process, epoch, block)`
    and handed out. `datasets`' own shuffle buffer drops its content when a state is restored, whereas a block is
    re-read from the `datasets` state saved at its start, so `load_state_dict` resumes with exactly the next
    example, re-reading (not decoding) at most one block.

    Iterating yields the rest of the current epoch and then moves to the start of the next one. Track the
    position with `state_dict()` while iterating in the main process ([`ResumableLoader`][diffit_diffusers.training.ResumableLoader] does).
    """

    def __init__(self, hf_stream: datasets.IterableDataset, *, shuffle_buffer_size: int, **kwargs):
        super().__init__(**kwargs)
        if shuffle_buffer_size < 1:
            raise ValueError(f"`shuffle_buffer_size` must be a positive integer, got {shuffle_buffer_size}.")
        self.hf_stream = hf_stream
        self.shuffle_buffer_size = shuffle_buffer_size
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`."""
        self._epoch = epoch
        self._block_index = 0
        self._block_offset = 0
        self._block_start_state: Optional[dict] = None

    def state_dict(self) -> dict[str, Any]:
        """The position after the last yielded example (JSON-serializable)."""
        return {
            "kind": "streaming",
            "epoch": self._epoch,
            "block_index": self._block_index,
            "block_offset": self._block_offset,
            "block_start_state": copy.deepcopy(self._block_start_state),
            "shuffle_buffer_size": self.shuffle_buffer_size,
            "seed": self.seed,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a position saved by `state_dict()`; the next iteration continues from it."""
        _check_state_matches(
            state_dict,
            kind="streaming",
            seed=self.seed,
            shuffle_buffer_size=self.shuffle_buffer_size,
            process_index=self.process_index,
            num_processes=self.num_processes,
        )
        self._epoch = state_dict["epoch"]
        self._block_index = state_dict["block_index"]
        self._block_offset = state_dict["block_offset"]
        self._block_start_state = copy.deepcopy(state_dict["block_start_state"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, from_epoch_start = self._epoch, self._block_start_state is None and self._block_offset == 0
        # A new split per pass gives a stream object with its own `datasets` state, free of earlier restores.
        stream = split_dataset_by_node(self.hf_stream, rank=self.process_index, world_size=self.num_processes)
        stream.set_epoch(epoch)
        if self._block_start_state is not None:
            stream.load_state_dict(self._block_start_state)
        raw_examples = iter(stream)
        # With DataLoader workers each worker reads its own shards (`datasets` splits them) and shuffles its blocks.
        worker = torch.utils.data.get_worker_info()
        key = (self.process_index,) if worker is None else (self.process_index, worker.num_workers, worker.id)
        found_usable_image = False
        while True:
            with _without_buffer_refill_warning():
                block = list(islice(raw_examples, self.shuffle_buffer_size))
            if not block:
                break
            next_block_start_state = stream.state_dict()
            block_index = self._block_index
            order = torch.randperm(
                len(block), generator=seeded_generator(self.seed, *key, epoch, block_index)
            ).tolist()
            for position in range(self._block_offset, len(block)):
                self._block_offset = position + 1
                generator = seeded_generator(self.seed, *key, epoch, block_index, position)
                where = f"example {position} of block {block_index} (epoch {epoch}, process {self.process_index})"
                example = self._make_example(block[order[position]], generator, where)
                if example is not None:
                    found_usable_image = True
                    yield example
            self._block_index, self._block_offset = block_index + 1, 0
            self._block_start_state = next_block_start_state
        if from_epoch_start and not found_usable_image:
            raise self._no_usable_image_error()
        self.set_epoch(epoch + 1)


def _check_state_matches(state_dict: dict[str, Any], **expected: Any) -> None:
    for key, value in expected.items():
        if state_dict.get(key) != value:
            raise ValueError(
                f"Cannot restore a data loader state saved with {key}={state_dict.get(key)!r} into one with "
                f"{key}={value!r}; resume with the same data settings, batch size, process count, process index and DataLoader workers."
            )


def prepare_stream(
    dataset: datasets.IterableDataset, config: DataConfig, num_processes: int, source_name: str
) -> datasets.IterableDataset:
    """Limits a stream to `max_train_samples`, checks that every DataLoader worker gets whole shards and shuffles
    the shard order (the examples are shuffled later, in blocks)."""
    if config.max_train_samples is not None:
        dataset = dataset.take(config.max_train_samples)
    # `datasets` gives each process whole shards when they divide evenly, else every shard to every process
    # (which then takes every n-th example); DataLoader workers of a process always need whole shards.
    shards = dataset.num_shards
    shards_per_process = shards // num_processes if shards % num_processes == 0 else shards
    workers = max(config.dataloader_num_workers, 1)
    if shards_per_process < workers:
        raise ValueError(
            f"{source_name} streams as {shards} shard(s), {shards_per_process} per process: fewer than the "
            f"{workers} DataLoader workers that would read them; lower `dataloader_num_workers` to at most "
            f"{shards_per_process}, or turn off streaming."
        )
    # A one-example buffer: `datasets` shuffles the shards and interleaves up to 10 of them (its default), the
    # blocks shuffle the examples. A single shard is not interleaved: that would only add `datasets`' 5 s
    # pause at the end of every pass over a parquet stream. Each worker interleaves as many shards as the
    # smallest share holds, so the stream position `datasets` saves in a worker has the structure of the
    # stream it is restored into.
    interleaved_shards = min(_MAX_INTERLEAVED_SHARDS, shards_per_process // workers)
    dataset = dataset.shuffle(seed=config.seed, buffer_size=1, max_buffer_input_shards=interleaved_shards)
    return dataset


def load_training_dataset(
    config: DataConfig,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    on_unreadable_image: Optional[UnreadableImageCallback] = None,
) -> Union[ImageDataset, StreamingImageDataset]:
    """Loads the training images (or, with `config.latents_dataset`, the cached latents, see
    `load_latents_dataset`) described by `config` for process `process_index` of `num_processes`.

    Returns an [`ImageDataset`][diffit_diffusers.training.ImageDataset] (map-style, every example visible to every process) or, when `config.streaming`,
    a [`StreamingImageDataset`][diffit_diffusers.training.StreamingImageDataset] holding this process's share of the stream. `on_unreadable_image(description,
    error)` is called for every skipped image, in addition to a `logging` warning.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(
            f"`process_index` must be in 0..{num_processes - 1} for {num_processes} process(es), got {process_index}."
        )
    if config.latents_dataset is not None:
        from .latents import load_latents_dataset

        return load_latents_dataset(config, process_index=process_index, num_processes=num_processes)
    dataset, source_name = _load_source(config)
    if config.streaming and isinstance(dataset, datasets.Dataset):
        dataset = dataset.to_iterable_dataset(num_shards=min(_STREAMING_NUM_SHARDS, max(1, len(dataset))))
    dataset, image_column, class_names = _prepare_columns(dataset, config, source_name)
    common = {
        "image_column": image_column,
        "label_column": config.label_column,
        "class_names": class_names,
        "transform": ImageTransform.from_config(config),
        "seed": config.seed,
        "source_name": source_name,
        "process_index": process_index,
        "num_processes": num_processes,
        "on_unreadable_image": on_unreadable_image,
    }
    if isinstance(dataset, datasets.IterableDataset):
        dataset = prepare_stream(dataset, config, num_processes, source_name)
        return StreamingImageDataset(dataset, shuffle_buffer_size=config.shuffle_buffer_size, **common)
    if len(dataset) == 0:
        raise ValueError(f"{source_name} has no examples in split {config.split!r}.")
    if config.max_train_samples is not None and config.max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=config.seed).select(range(config.max_train_samples))
    return ImageDataset(dataset, **common)


def collate_examples(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stacks examples into `{"pixel_values": (B, C, H, W), "class_labels": (B,)}` with torch's `default_collate`
    (which, in a DataLoader worker, stacks straight into shared memory)."""
    return torch.utils.data.default_collate(examples)


class EpochSampler(torch.utils.data.Sampler):
    """Endless `(epoch, index)` keys of a map-style dataset, exactly resumable.

    Each epoch visits a permutation of `range(num_examples)` seeded by `(seed, epoch)`; epochs follow each other
    without end. The state is the epoch and the position in it (torchdata's `StatefulDataLoader` saves and restores
    it). With several processes, accelerate's `prepare_data_loader` deals the batches out: process `r` of `w` takes
    batches `r, r + w, ...`.
    """

    def __init__(self, num_examples: int, *, seed: int):
        self.num_examples = num_examples
        self.seed = seed
        self.epoch, self.position = 0, 0

    def indices(self, epoch: int) -> list[int]:
        """The permutation of `epoch`."""
        return torch.randperm(self.num_examples, generator=seeded_generator(self.seed, epoch)).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        while True:
            indices = self.indices(self.epoch)
            while self.position < len(indices):
                index = indices[self.position]
                self.position += 1
                yield self.epoch, index
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "map",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_state_matches(state_dict, kind="map", seed=self.seed, num_examples=self.num_examples)
        self.epoch, self.position = state_dict["epoch"], state_dict["position"]


class _EndlessStream(torch.utils.data.IterableDataset):
    """A `StreamingImageDataset` read epoch after epoch without end (in whichever process iterates it)."""

    def __init__(self, dataset: "StreamingImageDataset"):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from self.dataset

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state_dict)


class _SharedPixelBuffers:
    """Shared-memory pixel batches that each DataLoader worker refills instead of creating a segment per batch.

    `default_collate` stacks every batch of a worker into a fresh shared-memory segment: its pages are faulted in
    by the worker that fills it and again by the training process that reads it, and unmapped on both sides, which
    costs more than the copy itself (stacking a 16x3x256x256 uint8 batch takes a worker 3.5 ms instead of 0.9 ms on
    the 2-core benchmark machine). Here a worker stacks into one of its own buffers instead, and a buffer is refilled
    only once the training process holds nothing of the batch it carried:

    - `in_use[worker, slot]` lives in shared memory (created here, before the workers start). Only a worker sets
      an entry of its row, before handing the buffer over; only the training process clears it, once torch's weak
      reference to the storage of the batch it received has expired (every reference dropped, views included).
      The shared buffer is only read to build that batch (off the CPU, the pinned or device copy is made from it
      before the training process gets it), so nothing can read it after that;
    - a worker without a free buffer (all handed over, or its row filled by batches a restarted worker left
      undelivered, which are never released) stacks into a fresh segment as before.

    The batches are the ones `collate_examples` builds, bit for bit.
    """

    def __init__(self, num_workers: int, slots_per_worker: int):
        self.in_use = torch.zeros(num_workers, slots_per_worker, dtype=torch.bool).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # a worker's own buffers, by slot
        self._handed_over: list[tuple[int, int, StorageWeakRef]] = []  # training process: (worker, slot, storage)

    def __getstate__(self) -> dict[str, Any]:
        # A worker started with `spawn` gets the shared flags (the fd travels), no buffers and nothing to track.
        return {**self.__dict__, "_buffers": {}, "_handed_over": []}

    def stack(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[tuple[int, int]]]:
        """In a worker: the stacked batch and the `(worker, slot)` it occupies (`None` for a fresh segment)."""
        worker = torch.utils.data.get_worker_info().id
        shape = (len(pixels), *pixels[0].shape)
        for slot in torch.nonzero(~self.in_use[worker]).flatten().tolist():
            buffer = self._buffers.get(slot)
            if buffer is None or (buffer.shape == shape and buffer.dtype == pixels[0].dtype):
                break
        else:
            return torch.utils.data.default_collate(pixels), None
        if buffer is None:
            buffer = self._buffers[slot] = torch.empty(shape, dtype=pixels[0].dtype).share_memory_()
        self.in_use[worker, slot] = True
        return torch.stack(pixels, out=buffer), (worker, slot)

    def received(self, slot: tuple[int, int], pixels: torch.Tensor) -> None:
        """In the training process: `pixels` was built from the buffer in `slot`; free it once `pixels` is gone."""
        self._handed_over.append((*slot, StorageWeakRef(pixels.untyped_storage())))

    def release_unused(self) -> None:
        """In the training process: hands the buffers of every batch no longer referenced back to their workers."""
        kept = []
        for worker, slot, storage in self._handed_over:
            if storage.expired():
                self.in_use[worker, slot] = False
            else:
                kept.append((worker, slot, storage))
        self._handed_over = kept


class _CountingCollate:
    """`collate_examples` plus the number of images the (worker's) dataset skipped since the previous batch (a
    Python int, which accelerate leaves where it is when it moves the batch to the device).

    In a worker (`buffers` given), the batch is laid out for the hand-over instead: pixels in one of the worker's
    reusable shared buffers (`_SharedPixelBuffers`), with the slot they occupy, and class labels as Python ints,
    which travel in the pickled batch (a tensor of 16 labels costs a shared-memory segment and a file-descriptor
    hand-over of its own: 5 ms of the training process per batch on the 2-core benchmark machine).
    `ResumableLoader.next_batch` turns them back into the batch `collate_examples` builds.
    """

    def __init__(self, dataset: _ImageExamples, buffers: Optional[_SharedPixelBuffers] = None):
        self.dataset = dataset
        self.buffers = buffers
        self.reported = 0

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        batch = collate_examples(examples) if self.buffers is None else self._for_hand_over(examples)
        batch[_SKIPPED_KEY] = self.dataset.skipped_images - self.reported
        self.reported = self.dataset.skipped_images
        return batch

    def _for_hand_over(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        batch = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if key == "pixel_values":
                batch[key], batch[_BUFFER_KEY] = self.buffers.stack(values)
            elif key == "class_labels":
                batch[key] = [int(value) for value in values]
            else:
                batch[key] = collate_examples(values)
        return batch


_SKIPPED_KEY = "_skipped_images"
_BUFFER_KEY = "_pixel_buffer"
# Batches each DataLoader worker prepares ahead.
_PREFETCH_FACTOR = 2
# Reusable pixel buffers per worker: its batches in flight, the one accelerate reads ahead, the one being returned,
# with room for slots lost to a worker restart. Each is created when first needed.
_PIXEL_BUFFERS_PER_WORKER = 2 * _PREFETCH_FACTOR + 4


class ResumableLoader:
    """An endless stream of batches from one process's share of a training dataset, on its device, with exact resume.

    A torchdata `StatefulDataLoader` with `num_workers` worker processes decodes, transforms and collates the
    examples (unreadable images are skipped and counted in the workers), and accelerate's `prepare_data_loader`
    prepares it: it moves each batch to `device` and, for an
    [`ImageDataset`][diffit_diffusers.training.ImageDataset], shards the batches over the dataset's
    `num_processes` (process `r` takes batches `r, r + w, ...` of an
    [`EpochSampler`][diffit_diffusers.training.EpochSampler] over the whole dataset: each epoch a permutation seeded
    by `(seed, epoch)`). A [`StreamingImageDataset`][diffit_diffusers.training.StreamingImageDataset] already holds
    this process's share of the stream (`datasets`' `split_dataset_by_node`); it is read epoch after epoch and, with
    workers, each worker reads its own shards and block-shuffles them. Batches run across epoch boundaries.

    Images travel as uint8 and are turned into floats in [-1, 1] on `device` (`normalize_pixels`), so batches are
    `{"pixel_values": float32 (B, C, H, W), "class_labels": (B,)}` whatever the number of workers. Each worker
    stacks pixels into a few shared-memory buffers of its own, refilled once the batch they carried is no longer
    referenced here, instead of a fresh segment per batch, and sends labels as ints (torch's hand-over of a tensor
    costs more than decoding a few images; see the "Training faster" guide). Restoring `state_dict()` (accelerate's
    stateful loader state, with the settings it is valid for) into a loader built the same way yields exactly the
    batches that would have followed. The state belongs to one process: with several processes, save and restore
    each process's state.

    Attributes:
        skipped_images (`int`): Unreadable images skipped so far to build the batches returned (all workers).
    """

    def __init__(
        self,
        dataset: Union[ImageDataset, StreamingImageDataset],
        batch_size: int,
        num_workers: int = 0,
        device: Optional[torch.device] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}.")
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.skipped_images = 0
        # Pinned pages let a GPU copy the next batch while the current step runs.
        pin_memory = device is not None and torch.device(device).type == "cuda"
        self._pixel_buffers = _SharedPixelBuffers(num_workers, _PIXEL_BUFFERS_PER_WORKER) if num_workers else None
        loader_kwargs = {
            "batch_size": batch_size,
            "num_workers": num_workers,
            "collate_fn": _CountingCollate(dataset, self._pixel_buffers),
            "pin_memory": pin_memory,
            "persistent_workers": num_workers > 0,
            "prefetch_factor": _PREFETCH_FACTOR if num_workers > 0 else None,
            # Its own generator: starting to iterate must not draw from the global RNG that the training
            # objective uses (and checkpoints restore), or a resumed run would see other noise.
            "generator": torch.Generator().manual_seed(dataset.seed),
        }
        if isinstance(dataset, ImageDataset):
            sampler = EpochSampler(len(dataset), seed=dataset.seed)
            loader = StatefulDataLoader(dataset, sampler=sampler, **loader_kwargs)
            num_processes, process_index = dataset.num_processes, dataset.process_index
        else:
            loader = StatefulDataLoader(_EndlessStream(dataset), **loader_kwargs)
            num_processes, process_index = 1, 0
        self.loader = prepare_data_loader(
            loader,
            device=device,
            num_processes=num_processes,
            process_index=process_index,
            put_on_device=device is not None,
            dispatch_batches=False,
            non_blocking=pin_memory,
            use_stateful_dataloader=True,
        )
        self._batches: Optional[Iterator[dict[str, Any]]] = None
        # The restored position until the first batch (accelerate's loader reports its own only once it iterates).
        self._restored_position: Optional[dict[str, Any]] = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next `{"pixel_values": (B, C, H, W), "class_labels": (B,)}` batch (labels only when labeled)."""
        if self._batches is None:
            self._batches = iter(self.loader)
        if self._pixel_buffers is not None:
            self._pixel_buffers.release_unused()
        batch = next(self._batches)
        self._restored_position = None
        self.skipped_images += batch.pop(_SKIPPED_KEY)
        slot = batch.pop(_BUFFER_KEY, None)
        if slot is not None:
            self._pixel_buffers.received(slot, batch["pixel_values"])
        if isinstance(batch.get("class_labels"), list):  # from a worker
            batch["class_labels"] = torch.tensor(batch["class_labels"], dtype=torch.long, device=self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = normalize_pixels(batch["pixel_values"])
        return batch

    def _settings(self) -> dict[str, Any]:
        """What a saved position is only valid for."""
        dataset = self.dataset
        settings = {
            "kind": "map" if isinstance(dataset, ImageDataset) else "streaming",
            "seed": dataset.seed,
            "process_index": dataset.process_index,
            "num_processes": dataset.num_processes,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
        }
        if isinstance(dataset, ImageDataset):
            settings["num_examples"] = len(dataset)
        else:
            settings["shuffle_buffer_size"] = dataset.shuffle_buffer_size
        return settings

    def state_dict(self) -> dict[str, Any]:
        """The loader's position after the last returned batch (JSON-serializable)."""
        position = self._restored_position if self._restored_position is not None else self.loader.state_dict()
        return {**self._settings(), "loader": position, "skipped_images": self.skipped_images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a position saved by `state_dict()` (call it before the first `next_batch`)."""
        _check_state_matches(state_dict, **self._settings())
        self._batches = None
        self.loader.load_state_dict(state_dict["loader"])
        self._restored_position = copy.deepcopy(state_dict["loader"])
        self.skipped_images = state_dict["skipped_images"]
