"""Smoke tests of `benchmarks/quality.py` on tiny synthetic Fashion-MNIST IDX files, so that the benchmark keeps
working: IDX parsing, the parquet dataset, the UNet2DModel adapter, the judge and a 2-step end-to-end run."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark_script

from diffit_diffusers.training import DataConfig, load_training_dataset


quality = load_benchmark_script("quality.py", "quality_benchmark")
IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzipped when `path` ends in .gz)."""
    array = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header + array.tobytes())
    return path


def write_fashion_mnist(folder: Path, num_train: int = 60, num_test: int = 40, seed: int = 0) -> Path:
    """Tiny Fashion-MNIST look-alike: class `c` images are noise plus a bright band at row `2c`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels):
            image[2 * label : 2 * label + 4] = 250
        images_stem, labels_stem = quality.SPLIT_FILES[split]
        write_idx(folder / f"{images_stem}.gz", images)
        write_idx(folder / labels_stem, labels)
    return folder


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-7, 0, 70000], ">i4")])
def test_read_idx_round_trips(tmp_path, suffix, array):
    read = quality.read_idx(write_idx(tmp_path / f"data{suffix}", array))
    assert read.shape == array.shape
    np.testing.assert_array_equal(read, array)
    assert read.dtype.isnative


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((3, 4, 4), np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        quality.read_idx(path)
    (tmp_path / "picture").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        quality.read_idx(tmp_path / "picture")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="Could not read the IDX file"):
        quality.read_idx(tmp_path / "broken.gz")


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        quality.load_fashion_mnist(tmp_path, "train")
    monkeypatch.setattr(quality, "DEBIAN_DATA_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        quality.load_fashion_mnist(tmp_path, "test")


def test_load_fashion_mnist_checks_the_files_agree(tmp_path):
    folder = write_fashion_mnist(tmp_path)
    images, labels = quality.load_fashion_mnist(folder, "test")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    write_idx(folder / quality.SPLIT_FILES["test"][1], np.zeros(39, np.uint8))
    with pytest.raises(ValueError, match="must match"):
        quality.load_fashion_mnist(folder, "test")
    write_idx(folder / quality.SPLIT_FILES["test"][1], np.full(40, 10, np.uint8))
    with pytest.raises(ValueError, match="outside 0..9"):
        quality.load_fashion_mnist(folder, "test")


def test_parquet_dataset_is_what_the_trainer_reads(tmp_path):
    images, labels = quality.load_fashion_mnist(write_fashion_mnist(tmp_path / "idx"), "train")
    path = quality.write_parquet_dataset(images, labels, tmp_path / "train.parquet")
    dataset = load_training_dataset(
        DataConfig(dataset_name=str(path), label_column="label", resolution=28, num_channels=1, cache_dir=str(tmp_path))
    )
    assert dataset.num_classes == 10
    assert dataset.id2label[0] == "T-shirt/top" and dataset.id2label[9] == "Ankle boot"
    example = dataset[3]
    assert int(example["class_labels"]) == labels[3]
    assert torch.equal(example["pixel_values"], torch.from_numpy(images[3])[None])


def test_unet2d_adapter_has_the_guidance_interface(tmp_path):
    torch.manual_seed(0)
    model = quality.build_contestant("unet2d", num_classes=10, in_channels=1, sample_size=28, class_dropout_prob=0.5)
    assert model.config.num_classes == 10 and model.null_class_id == 10
    with torch.no_grad():
        model.unet.conv_out.weight.normal_()
    sample, timestep = torch.randn(6, 1, 28, 28), torch.rand(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    model.eval()
    with torch.no_grad():
        conditional = model(sample, timestep, labels).sample
        unconditional = model(sample, timestep, torch.full_like(labels, 10)).sample
        torch.manual_seed(1)
        model.train()
        trained = model(sample, timestep, labels).sample
    assert conditional.shape == (6, 1, 28, 28)
    dropped = torch.isclose(trained, unconditional, atol=1e-5).flatten(1).all(dim=1)
    kept = torch.isclose(trained, conditional, atol=1e-5).flatten(1).all(dim=1)
    assert (dropped | kept).all() and dropped.any() and kept.any()
    model.save_pretrained(tmp_path / "denoiser")
    reloaded = quality.ClassConditionalUNet2DModel.from_pretrained(tmp_path / "denoiser").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, timestep, labels).sample, conditional)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        quality.build_contestant("unet2d", num_classes=10, in_channels=1, sample_size=28, class_dropout_prob=0.0)


def test_contestants_denoise_28px_images_within_the_parameter_budget():
    models = {
        name: quality.build_contestant(name, num_classes=10, in_channels=1, sample_size=28, class_dropout_prob=0.1)
        for name in quality.CONTESTANTS
    }
    sample, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 10])
    for model in models.values():
        with torch.no_grad():
            assert model.eval()(sample, torch.tensor([0.5, -1.0]), labels).sample.shape == sample.shape
        assert model.config.num_classes == 10 and model.null_class_id == 10
    quality.check_parameter_budget({name: quality.count_parameters(model) for name, model in models.items()})
    with pytest.raises(ValueError, match="differ by more than 10%"):
        quality.check_parameter_budget({"small": 100, "large": 111})


def test_judge_learns_and_exposes_penultimate_features(tmp_path):
    images, labels = quality.load_fashion_mnist(write_fashion_mnist(tmp_path, num_train=200), "train")
    judge = quality.train_judge(
        quality.to_unit_tensor(images), torch.from_numpy(labels), epochs=3, batch_size=50, seed=0
    )
    assert not judge.training
    accuracy = (quality.predict(judge, quality.to_unit_tensor(images)).numpy() == labels).mean()
    assert accuracy > 0.5
    output = quality.judge_extractor(judge).extract(quality.to_unit_tensor(images[:5]))
    assert output.features.shape == (5, 64) and output.logits.shape == (5, 10)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_samples", "20"], "at least 40"),
        (["--guidance_scale", "1"], "must be > 1"),
        (["--max_train_steps", "0"], "positive integer"),
        (["--contestants", "unet2d", "unet2d"], "twice"),
    ],
)
def test_bad_flags_are_rejected(capsys, flags, message):
    with pytest.raises(SystemExit):
        quality.parse_args(flags)
    assert message in capsys.readouterr().err


def test_two_step_benchmark_writes_the_report(tmp_path, capsys):
    """The whole script on tiny data with the UNet2DModel adapter, the contestant the library cannot build."""
    data_dir = write_fashion_mnist(tmp_path / "idx")
    flags = [
        "--data_dir", str(data_dir),
        "--work_dir", str(tmp_path / "work"),
        "--results_dir", str(tmp_path / "results"),
        "--grid_dir", str(tmp_path / "grids"),
        "--max_train_steps", "2",
        "--train_batch_size", "4",
        "--lr_warmup_steps", "0",
        "--num_samples", "40",
        "--eval_batch_size", "20",
        "--num_inference_steps", "2",
        "--judge_epochs", "1",
        "--judge_batch_size", "20",
        "--contestants", "unet2d",
    ]  # fmt: skip
    assert quality.main(flags) == 0
    results = json.loads((tmp_path / "results" / "quality-2x4.json").read_text())
    assert list(results["contestants"]) == ["unet2d"]
    assert results["command"].startswith("python benchmarks/quality.py --data_dir")
    assert results["settings"]["max_train_steps"] == 2
    assert 0.0 <= results["judge"]["test_accuracy"] <= 1.0
    metrics = ("frechet_distance", "precision", "recall", "class_accuracy", "inception_score")
    for row in [results["real_data"], *results["contestants"].values()]:
        assert all(np.isfinite(row[key]) for key in metrics)
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
        assert Path(row["grid"]).is_file()
    for name, row in results["contestants"].items():
        assert row["model_class"] == quality.CONTESTANTS[name][0].__name__
        assert row["parameters"] > 0 and row["training_seconds"] > 0
        assert (tmp_path / "work" / "runs" / name / "model_index.json").is_file()
    table = capsys.readouterr().out
    assert "| `unet2d` (ClassConditionalUNet2DModel) | 397K |" in table and "| real training images |" in table
