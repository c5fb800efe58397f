import json
import logging
from collections import Counter
from functools import partial

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from diffit_diffusers.training import (
    DataConfig,
    EpochSampler,
    ImageDataset,
    ImageTransform,
    ResumableLoader,
    StreamingImageDataset,
    load_training_dataset,
    normalize_pixels,
)


CLASS_NAMES = ["cat", "dog"]
IMAGES_PER_CLASS = 5


def solid_image(value: int, size: tuple[int, int] = (8, 8)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, (value, value, value))


def class_value(label: int, index: int) -> int:
    """Gray level of image `index` of class `label` in the fixtures: unique, and >= 128 exactly for class 1."""
    return 128 * label + 10 * index


def pixel_identity(pixel_values: torch.Tensor) -> int:
    """The gray level a fixture image was written with, read back from an example's uint8 pixels or from a batch's
    floats in [-1, 1]."""
    level = pixel_values[0, 0, 0].item()
    return int(level) if pixel_values.dtype == torch.uint8 else round((level + 1) * 127.5)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for label, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True)
        for index in range(IMAGES_PER_CLASS):
            solid_image(class_value(label, index)).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def parquet_file(tmp_path):
    """24 unique 8x8 gray images, class label = value >= 128, plus an unrelated text column."""
    values = [10 * index for index in range(24)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["dark", "bright"]),
            "caption": datasets.Value("string"),
        }
    )
    table = {
        "image": [solid_image(value) for value in values],
        "label": [int(value >= 128) for value in values],
        "caption": ["x"] * len(values),
    }
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return path


def make_config(tmp_path, **kwargs) -> DataConfig:
    defaults = {"resolution": 8, "cache_dir": str(tmp_path / "cache")}
    return DataConfig(**{**defaults, **kwargs})


def take_batches(loader: ResumableLoader, count: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch_a, batch_b in zip(first, second):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            assert batch_a[key].dtype == batch_b[key].dtype and torch.equal(batch_a[key], batch_b[key]), key


def test_digits_shapes_ranges_and_labels(tmp_path):
    from sklearn.datasets import load_digits

    dataset = load_training_dataset(make_config(tmp_path, dataset_name="digits", label_column="label", num_channels=1))
    assert isinstance(dataset, ImageDataset)
    assert len(dataset) == 1797
    assert dataset.num_classes == 10
    assert dataset.id2label == {digit: str(digit) for digit in range(10)}
    digits = load_digits()
    for index in (0, 5, 1796):
        example = dataset[index]
        assert example["pixel_values"].shape == (1, 8, 8)
        assert example["pixel_values"].dtype == torch.uint8
        assert example["class_labels"].dtype == torch.long and example["class_labels"].ndim == 0
        assert example["class_labels"].item() == digits.target[index]
        # At the native 8x8 resolution nothing is resampled: 0..16 -> 0..255.
        expected = torch.from_numpy(np.rint(digits.images[index] * 255 / 16)).to(torch.uint8)
        assert torch.equal(example["pixel_values"][0], expected)

    upsampled = load_training_dataset(make_config(tmp_path, dataset_name="digits", resolution=16))
    pixels = torch.stack([upsampled[index]["pixel_values"] for index in range(64)])
    assert pixels.shape == (64, 3, 16, 16)
    assert pixels.min() == 0 and 240 < pixels.max() <= 255
    assert upsampled.num_classes is None and upsampled.id2label is None
    assert "class_labels" not in upsampled[0]


def test_image_transform_resizes_shorter_side_and_crops():
    image = PIL.Image.new("L", (40, 20))
    image.paste(255, (14, 0, 26, 20))  # a bright vertical bar in the middle
    centered = ImageTransform(resolution=10, num_channels=3)(image)
    assert centered.shape == (3, 10, 10) and centered.dtype == torch.uint8
    assert centered[:, :, 4:6].min() > 240 and centered[:, :, 0].max() == 0
    random_crop = ImageTransform(resolution=10, num_channels=1, center_crop=False)
    grayscale = random_crop(image, torch.Generator().manual_seed(0))
    assert grayscale.shape == (1, 10, 10)
    with pytest.raises(ValueError, match="num_channels"):
        ImageTransform(resolution=10, num_channels=2)


def test_image_folder_labels_come_from_subfolders(tmp_path, image_folder):
    dataset = load_training_dataset(make_config(tmp_path, train_data_dir=str(image_folder), label_column="label"))
    assert len(dataset) == 2 * IMAGES_PER_CLASS
    assert dataset.id2label == {0: "cat", 1: "dog"}
    for index in range(len(dataset)):
        example = dataset[index]
        assert example["class_labels"].item() == int(pixel_identity(example["pixel_values"]) >= 128)


def test_parquet_keeps_class_names_and_finds_a_renamed_image_column(tmp_path):
    values = [0, 200, 40]
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")})
    path = tmp_path / "renamed.parquet"
    table = {"picture": [solid_image(v) for v in values], "kind": ["low", "high", "low"]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))

    dataset = load_training_dataset(make_config(tmp_path, dataset_name=str(path), label_column="kind"))
    assert dataset.image_column == "picture"
    assert dataset.id2label == {0: "high", 1: "low"}  # string labels are class-encoded in sorted order
    assert [dataset[index]["class_labels"].item() for index in range(3)] == [1, 0, 1]
    with pytest.raises(ValueError, match="ClassLabel"):
        load_training_dataset(make_config(tmp_path, dataset_name=str(path), label_column="kind", streaming=True))


def test_dataset_saved_to_disk_loads(tmp_path, parquet_file):
    folder = tmp_path / "saved"
    datasets.Dataset.from_parquet(str(parquet_file), cache_dir=str(tmp_path / "cache")).save_to_disk(str(folder))
    dataset = load_training_dataset(make_config(tmp_path, dataset_name=str(folder), label_column="label"))
    assert len(dataset) == 24 and dataset.id2label == {0: "dark", 1: "bright"}


def write_broken_images(folder):
    (folder / "cat" / "garbage.png").write_bytes(b"these bytes are not an image")
    png = (folder / "cat" / "0.png").read_bytes()
    (folder / "dog" / "truncated.png").write_bytes(png[: len(png) // 2])


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, image_folder, caplog):
    write_broken_images(image_folder)
    reported = []
    dataset = load_training_dataset(
        make_config(tmp_path, train_data_dir=str(image_folder), label_column="label"),
        on_unreadable_image=lambda description, error: reported.append(description),
    )
    assert len(dataset) == 2 * IMAGES_PER_CLASS + 2
    with caplog.at_level(logging.WARNING, logger="diffit_diffusers.training.data"):
        identities = [pixel_identity(dataset[index]["pixel_values"]) for index in range(len(dataset))]
        identities += [pixel_identity(dataset[index]["pixel_values"]) for index in range(len(dataset))]
    assert dataset.skipped_images == 2  # each broken file is counted once, however often it is asked for
    assert sorted(description.split("/")[-1].rstrip(")") for description in reported) == [
        "garbage.png",
        "truncated.png",
    ]
    assert sum("Skipping unreadable image" in record.getMessage() for record in caplog.records) == 2
    all_values = {class_value(label, index) for label in range(2) for index in range(IMAGES_PER_CLASS)}
    assert set(identities) == all_values

    streamed = load_training_dataset(
        make_config(tmp_path, train_data_dir=str(image_folder), label_column="label", streaming=True)
    )
    assert sorted(pixel_identity(example["pixel_values"]) for example in streamed) == sorted(all_values)
    assert streamed.skipped_images == 2


def test_image_deleted_after_loading_is_skipped(tmp_path, image_folder):
    dataset = load_training_dataset(make_config(tmp_path, train_data_dir=str(image_folder)))
    (image_folder / "dog" / "3.png").unlink()
    identities = {pixel_identity(dataset[index]["pixel_values"]) for index in range(len(dataset))}
    assert dataset.skipped_images == 1
    assert class_value(1, 3) not in identities and len(identities) == 2 * IMAGES_PER_CLASS - 1


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_without_a_readable_image_raises(tmp_path, streaming):
    folder = tmp_path / "broken"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(b"\x89PNG broken")
    dataset = load_training_dataset(make_config(tmp_path, train_data_dir=str(folder), streaming=streaming))
    with pytest.raises(ValueError, match=r"No usable image in column 'image' of image folder .*broken"):
        ResumableLoader(dataset, batch_size=2).next_batch()
    assert dataset.skipped_images == 3


def test_unknown_columns_raise_and_list_the_available_ones(tmp_path, parquet_file):
    for streaming in (False, True):
        source = {"dataset_name": str(parquet_file), "streaming": streaming}
        with pytest.raises(ValueError, match=r"'photo' not found.*\['image', 'label', 'caption'\]"):
            load_training_dataset(make_config(tmp_path, **source, image_column="photo"))
        with pytest.raises(ValueError, match=r"'class' not found.*\['image', 'label', 'caption'\]"):
            load_training_dataset(make_config(tmp_path, **source, label_column="class"))
    with pytest.raises(ValueError, match="'label'.*not images"):
        load_training_dataset(make_config(tmp_path, dataset_name=str(parquet_file), image_column="label"))


def test_missing_or_ambiguous_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_training_dataset(make_config(tmp_path, train_data_dir=str(tmp_path / "no_such_folder")))
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        load_training_dataset(make_config(tmp_path, dataset_name=str(tmp_path / "missing.parquet")))
    with pytest.raises(ValueError, match="No training data"):
        DataConfig()
    with pytest.raises(ValueError, match="only one"):
        DataConfig(dataset_name="digits", train_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="resolution"):
        DataConfig(dataset_name="digits", resolution=0)
    with pytest.raises(ValueError, match="process_index"):
        load_training_dataset(DataConfig(dataset_name="digits"), process_index=2, num_processes=2)


def test_streaming_splits_a_parquet_file_across_processes(tmp_path, parquet_file):
    config = make_config(tmp_path, dataset_name=str(parquet_file), streaming=True, shuffle_buffer_size=5)

    def identities(dataset):
        return Counter(pixel_identity(example["pixel_values"]) for example in dataset)

    everything = identities(load_training_dataset(config))
    assert everything == Counter(10 * index for index in range(24))
    shares = [identities(load_training_dataset(config, process_index=rank, num_processes=2)) for rank in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == everything
    assert all(sum(share.values()) == 12 for share in shares)


def test_streaming_splits_digits_shards_across_processes(tmp_path):
    config = make_config(tmp_path, dataset_name="digits", label_column="label", streaming=True, shuffle_buffer_size=64)

    def fingerprints(dataset):
        return Counter((ex["pixel_values"].numpy().tobytes(), int(ex["class_labels"])) for ex in dataset)

    streamed = load_training_dataset(config)
    assert isinstance(streamed, StreamingImageDataset) and streamed.id2label[3] == "3"
    everything = fingerprints(streamed)
    assert sum(everything.values()) == 1797
    shares = [fingerprints(load_training_dataset(config, process_index=rank, num_processes=2)) for rank in range(2)]
    assert shares[0] + shares[1] == everything
    assert abs(sum(shares[0].values()) - sum(shares[1].values())) < 200


def check_exact_resume(make_dataset, batch_size, before, after, num_workers=0):
    """Takes `before` batches, saves the state, takes `after` more; a fresh loader restored from it must match."""
    loader = ResumableLoader(make_dataset(), batch_size, num_workers=num_workers)
    take_batches(loader, before)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take_batches(loader, after)

    restored = ResumableLoader(make_dataset(), batch_size, num_workers=num_workers)
    restored.load_state_dict(state)
    assert restored.state_dict() == state  # saving again before the first batch keeps the position
    assert_same_batches(take_batches(restored, after), expected)
    # The continuation is not a restart.
    fresh = ResumableLoader(make_dataset(), batch_size, num_workers=num_workers)
    assert not torch.equal(fresh.next_batch()["pixel_values"], expected[0]["pixel_values"])
    return loader


@pytest.mark.parametrize("source", ["parquet", "folder"])
def test_streaming_resume_continues_with_the_exact_next_batches(tmp_path, parquet_file, image_folder, source):
    name = {"dataset_name": str(parquet_file)} if source == "parquet" else {"train_data_dir": str(image_folder)}
    config = make_config(
        tmp_path, **name, label_column="label", streaming=True, shuffle_buffer_size=4, random_flip=True
    )
    # 3-example batches over 24 (or 10) examples in blocks of 4 cross block and epoch boundaries.
    assert (5 + 9) * 3 > 24
    check_exact_resume(partial(load_training_dataset, config), batch_size=3, before=5, after=9)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_is_exact_with_dataloader_workers(tmp_path, streaming):
    """Two workers decode in parallel; the restored loader continues with exactly the next batches, across epochs."""
    config = make_config(
        tmp_path, dataset_name="digits", label_column="label", streaming=streaming, shuffle_buffer_size=50,
        random_flip=True, center_crop=False, dataloader_num_workers=2,
    )
    assert (4 + 16) * 100 > 1797  # crosses the end of the epoch in every worker
    check_exact_resume(partial(load_training_dataset, config), batch_size=100, before=4, after=16, num_workers=2)
    serial = ResumableLoader(load_training_dataset(config), batch_size=100)
    with pytest.raises(ValueError, match="num_workers"):
        serial.load_state_dict(ResumableLoader(load_training_dataset(config), 100, num_workers=2).state_dict())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_hold_the_examples_pixels_as_floats(tmp_path, num_workers):
    """Workers hand over uint8 pixels; the loader's batches are exactly `level / 127.5 - 1` of the examples."""
    config = make_config(
        tmp_path, dataset_name="digits", label_column="label", resolution=12, random_flip=True, center_crop=False
    )
    dataset = load_training_dataset(config)
    batch = ResumableLoader(dataset, batch_size=5, num_workers=num_workers).next_batch()
    examples = [dataset[(0, index)] for index in EpochSampler(len(dataset), seed=config.seed).indices(0)[:5]]
    pixels = torch.stack([example["pixel_values"] for example in examples])
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], pixels.float() / 127.5 - 1.0)
    assert torch.equal(batch["class_labels"], torch.stack([example["class_labels"] for example in examples]))
    with pytest.raises(ValueError, match="takes uint8 pixels, got torch.float32"):
        normalize_pixels(batch["pixel_values"])


def test_workers_refill_a_pixel_buffer_only_once_its_batch_is_released(tmp_path, monkeypatch):
    """Workers stack pixels into a few shared buffers they reuse and hand labels over as ints: the batches are those
    of the training process bit for bit, and a buffer whose batch the training process still references is never
    refilled."""
    config = make_config(tmp_path, dataset_name="digits", label_column="label", random_flip=True, center_crop=False)
    serial = ResumableLoader(load_training_dataset(config), batch_size=16)
    loader = ResumableLoader(load_training_dataset(config), batch_size=16, num_workers=2)
    buffers = loader._pixel_buffers
    track, slots, held = buffers.received, [], []

    def received(slot, pixels):
        slots.append(slot)
        if len(held) < 3:  # a consumer that keeps the first three uint8 batches
            held.append((pixels, pixels.clone()))
        track(slot, pixels)

    monkeypatch.setattr(buffers, "received", received)
    assert_same_batches(take_batches(loader, 40), take_batches(serial, 40))
    assert len(slots) == 40  # no fresh segment was needed
    assert len(set(slots)) < 20  # the buffers were refilled
    assert all(slots.count(slot) == 1 for slot in slots[:3])  # ... except the ones still held
    for pixels, original in held:
        assert torch.equal(pixels, original)


def test_pixel_buffers_reach_spawned_workers_with_shared_flags_only():
    """A worker started with `spawn` unpickles the buffers: the same shared `in_use` flags, none of the state of the
    training process."""
    from multiprocessing.reduction import ForkingPickler

    from diffit_diffusers.training.data import _SharedPixelBuffers

    buffers = _SharedPixelBuffers(num_workers=2, slots_per_worker=3)
    buffers.received((1, 2), torch.zeros(4, dtype=torch.uint8))
    copy = ForkingPickler.loads(ForkingPickler.dumps(buffers))
    assert copy._buffers == {} and copy._handed_over == [] and len(buffers._handed_over) == 1
    copy.in_use[0, 1] = True
    assert buffers.in_use[0, 1]


def test_accelerate_moves_the_batches_to_the_loaders_device(tmp_path):
    config = make_config(tmp_path, dataset_name="digits", label_column="label")
    batch = ResumableLoader(load_training_dataset(config), batch_size=3, device=torch.device("meta")).next_batch()
    assert batch["pixel_values"].device.type == "meta" and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["class_labels"].device.type == "meta"


def test_dataloader_workers_skip_and_count_unreadable_images(tmp_path, image_folder):
    write_broken_images(image_folder)
    config = make_config(tmp_path, train_data_dir=str(image_folder), label_column="label", dataloader_num_workers=2)
    loader = ResumableLoader(load_training_dataset(config), batch_size=6, num_workers=2)
    identities = [pixel_identity(pixels) for _ in range(2) for pixels in loader.next_batch()["pixel_values"]]
    assert loader.skipped_images >= 2  # each worker counts the broken files it meets
    assert set(identities) <= {class_value(label, index) for label in range(2) for index in range(IMAGES_PER_CLASS)}


def test_streaming_with_more_readers_than_shards_raises(tmp_path, parquet_file):
    config = make_config(tmp_path, dataset_name=str(parquet_file), streaming=True, dataloader_num_workers=2)
    with pytest.raises(ValueError, match="1 shard.*lower `dataloader_num_workers` to at most 1"):
        load_training_dataset(config)


def test_streaming_resume_on_two_processes(tmp_path):
    config = make_config(tmp_path, dataset_name="digits", label_column="label", streaming=True, shuffle_buffer_size=50)
    for rank in range(2):
        make_dataset = partial(load_training_dataset, config, process_index=rank, num_processes=2)
        check_exact_resume(make_dataset, batch_size=64, before=3, after=13)
    loader = ResumableLoader(load_training_dataset(config, process_index=0, num_processes=2), batch_size=4)
    loader.next_batch()
    other_process = ResumableLoader(load_training_dataset(config, process_index=1, num_processes=2), batch_size=4)
    with pytest.raises(ValueError, match="process_index"):
        other_process.load_state_dict(loader.state_dict())


def test_map_style_resume_continues_with_the_exact_next_batches(tmp_path):
    config = make_config(tmp_path, dataset_name="digits", label_column="label", random_flip=True, center_crop=False)
    for rank in range(2):
        make_dataset = partial(load_training_dataset, config, process_index=rank, num_processes=2)
        assert (4 + 7) * 100 > 1797 / 2  # crosses the end of the epoch
        check_exact_resume(make_dataset, batch_size=100, before=4, after=7)
    loader = ResumableLoader(load_training_dataset(config), batch_size=4)
    other_seed_dataset = load_training_dataset(make_config(tmp_path, dataset_name="digits", seed=1))
    other_seed = ResumableLoader(other_seed_dataset, batch_size=4)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(loader.state_dict())


def test_map_style_epochs_are_distinct_permutations_shared_by_processes(tmp_path, parquet_file):
    config = make_config(tmp_path, dataset_name=str(parquet_file))

    def batch_identities(loader):
        return [pixel_identity(pixels) for pixels in loader.next_batch()["pixel_values"]]

    loader = ResumableLoader(load_training_dataset(config), batch_size=24)
    epochs = [batch_identities(loader) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [10 * index for index in range(24)]
    assert epochs[0] != epochs[1]
    halves = [
        set(batch_identities(ResumableLoader(load_training_dataset(config, process_index=rank, num_processes=2), 12)))
        for rank in range(2)
    ]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 24


@pytest.mark.parametrize("streaming", [False, True])
def test_random_flips_are_reproducible_under_a_seed(tmp_path, streaming):
    half_bright = PIL.Image.new("L", (8, 8))
    half_bright.paste(255, (0, 0, 4, 8))  # bright left half; a flip moves it to the right
    path = tmp_path / "half.parquet"
    table = {"image": [half_bright] * 16}
    datasets.Dataset.from_dict(table, features=datasets.Features({"image": datasets.Image()})).to_parquet(str(path))

    def flips(seed):
        config = make_config(tmp_path, dataset_name=str(path), random_flip=True, seed=seed, streaming=streaming)
        pixels = ResumableLoader(load_training_dataset(config), batch_size=8).next_batch()["pixel_values"]
        return (pixels[:, 0, 0, 0] < 0).tolist()  # True where the bright half was flipped to the right

    assert flips(seed=0) == flips(seed=0)
    assert any(flips(seed=0)) and not all(flips(seed=0))
    assert flips(seed=0) != flips(seed=1)


def test_max_train_samples_limits_both_modes(tmp_path, parquet_file):
    for streaming in (False, True):
        config = make_config(tmp_path, dataset_name=str(parquet_file), max_train_samples=7, streaming=streaming)
        dataset = load_training_dataset(config)
        assert len(list(dataset) if streaming else range(len(dataset))) == 7
