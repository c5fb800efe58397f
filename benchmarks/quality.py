"""Sample quality on Fashion-MNIST: the image-space DiffiT U-Net against diffusers' ``UNet2DModel`` and a pixel-space
DiffiT transformer, at equal parameters, steps, batch, optimizer and sampler.

The script reads the Fashion-MNIST IDX files (Debian: ``apt-get install dataset-fashion-mnist``), writes the training
split as a parquet dataset (an ``image`` column and a ``label`` ClassLabel with the 10 class names) and trains each
contestant class-conditionally through ``diffit_diffusers.training`` (EDM objective, EMA, label dropout for
classifier-free guidance). The judge is a small CNN trained here on the training split: its penultimate features
give the Frechet distance (FD) against the test split and k-NN precision/recall, its predictions the share of guided
samples that show the class they were asked for. The results go to ``benchmarks/results/quality-<budget>.json``, a
labelled sample grid per model to ``docs/benchmarks/``, and a Markdown table to stdout.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --max_train_steps 600 --train_batch_size 32 --num_samples 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import struct
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from diffit_diffusers import DiffiTPipeline, DiffiTTransformer2DModel, DiffiTUNet2DModel
from diffit_diffusers.models.denoiser import DiffiTDenoiserMixin
from diffit_diffusers.evaluation import (
    FeatureStatistics,
    ModuleFeatureExtractor,
    class_labels_for_samples,
    evaluate_pipeline,
    evaluate_samples,
)
from diffit_diffusers.training import DataConfig, Trainer, TrainingConfig


DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
RESOLUTION = 28
# IDX type codes (http://yann.lecun.com/exdb/mnist/): unsigned byte, signed byte, short, int, float, double.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GRID_COLUMNS = 8
MAX_PARAMETER_SPREAD = 0.10


# ------------------------------------------------------------------------------------------------------------ data


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or gzipped) as a numpy array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        message = f"Could not read the IDX file {str(path)!r}: {error}. Reinstall or re-download it."
        raise ValueError(message) from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES or data[3] == 0:
        raise ValueError(
            f"{str(path)!r} is not an IDX file (its header should be two zero bytes, a type code in "
            f"{sorted(IDX_DTYPES)} and the number of dimensions)."
        )
    num_dims = data[3]
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise ValueError(f"The IDX file {str(path)!r} is truncated inside its header.")
    shape = struct.unpack(f">{num_dims}I", data[4:header_size])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected_size = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected_size:
        raise ValueError(
            f"The IDX file {str(path)!r} holds {len(data)} bytes but its header (shape {shape}, {dtype}) needs "
            f"{expected_size}; the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx_file(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    hint = (
        "Install it with `sudo apt-get install dataset-fashion-mnist`"
        if data_dir == DEBIAN_DATA_DIR
        else "Pass the folder holding the Fashion-MNIST IDX files with `--data_dir`"
    )
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {str(data_dir)!r}. {hint}.")


def load_fashion_mnist(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One Fashion-MNIST split: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)`` in 0..9."""
    if split not in SPLIT_FILES:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLIT_FILES)}.")
    data_dir = Path(data_dir)
    images_file, labels_file = (_find_idx_file(data_dir, stem) for stem in SPLIT_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.shape[1:] != (RESOLUTION, RESOLUTION) or images.dtype != np.uint8:
        raise ValueError(
            f"{str(images_file)!r} holds {images.dtype} images of shape {images.shape[1:]}; Fashion-MNIST images "
            f"are uint8 {RESOLUTION}x{RESOLUTION}."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{str(labels_file)!r} holds labels of shape {labels.shape} for {len(images)} images in "
            f"{str(images_file)!r}; the two files of a split must match."
        )
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{str(labels_file)!r} holds labels outside 0..{len(CLASS_NAMES) - 1}.")
    return images, labels


def write_parquet_dataset(images: np.ndarray, labels: np.ndarray, path: str | Path) -> Path:
    """Save images ``(N, H, W)`` uint8 and labels ``(N,)`` as a parquet dataset with an ``image`` column (PNG) and a
    ``label`` ClassLabel named after the Fashion-MNIST classes, which ``DataConfig.dataset_name`` can point at."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in images], "label": labels.tolist()}, features=features
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path))
    return path


def to_unit_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``(N, H, W)`` -> float ``(N, 1, H, W)`` in [0, 1]."""
    return torch.from_numpy(images).float().div(255.0).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------- judge


class FashionClassifier(nn.Module):
    """The judge: two conv stages and a ``feature_dim`` penultimate layer; images ``(B, 1, 28, 28)`` in [0, 1] ->
    logits ``(B, 10)``. ``penultimate`` is the layer whose output the quality metrics compare."""

    def __init__(self, feature_dim: int = 64, num_classes: int = len(CLASS_NAMES)):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.penultimate = nn.Sequential(nn.Linear(32 * (RESOLUTION // 4) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(self.body(images * 2.0 - 1.0)))


def train_judge(
    images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, seed: int
) -> FashionClassifier:
    """Train the judge for ``epochs`` passes over images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)`` with Adam,
    a one-cycle learning rate and random horizontal flips."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = FashionClassifier()
    optimizer = torch.optim.Adam(judge.parameters(), lr=2e-3)
    num_batches = epochs * -(-len(images) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=num_batches)
    judge.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            inputs = images[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
            loss = nn.functional.cross_entropy(judge(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return judge.eval()


@torch.no_grad()
def predict(judge: FashionClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes ``(N,)`` of images ``(N, 1, 28, 28)`` in [0, 1]."""
    return torch.cat([judge(batch).argmax(dim=1) for batch in images.split(batch_size)])


def judge_extractor(judge: FashionClassifier) -> ModuleFeatureExtractor:
    """The judge as a feature extractor: penultimate features, class logits."""
    return ModuleFeatureExtractor(judge, layer="penultimate", output_is_logits=True, name="fashion-mnist-cnn")


# ------------------------------------------------------------------------------------------------------ contestants


class ClassConditionalUNet2DModel(DiffiTDenoiserMixin, ModelMixin, ConfigMixin):
    """diffusers' ``UNet2DModel`` behind the denoiser interface of the DiffiT trainer and ``DiffiTPipeline``:
    ``(sample (B, C, H, W), timestep (B,), class_labels (B,)) -> .sample (B, C, H, W)``, ``config.num_classes``
    and a null class (id ``num_classes``, one extra row of the class embedding) that replaces each label with
    probability ``class_dropout_prob`` while training, for classifier-free guidance."""

    @register_to_config
    def __init__(
        self,
        sample_size: int,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        down_block_types: tuple[str, ...],
        up_block_types: tuple[str, ...],
        attention_head_dim: int,
        norm_num_groups: int,
        num_classes: int,
        class_dropout_prob: float,
    ):
        super().__init__()
        if not 0.0 < class_dropout_prob < 1.0:
            raise ValueError(f"`class_dropout_prob` must be in (0, 1) for guidance, got {class_dropout_prob}.")
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + 1,
        )

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = True
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        if self.training:
            dropped = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(dropped, self.null_class_id, class_labels)
        return self.unet(sample, timestep, class_labels, return_dict=return_dict)


#: The contestants at 28x28 grayscale: model class and config (data sizes and classes are filled in by the trainer).
CONTESTANTS: dict[str, tuple[type[ModelMixin], dict[str, Any]]] = {
    "diffit_unet": (
        DiffiTUNet2DModel,
        dict(
            block_out_channels=(24, 48),
            layers_per_block=1,
            window_size=7,
            attention_head_dim=12,
            mlp_ratio=2.0,
            norm_num_groups=8,
            time_embed_dim=128,
            mid_block_layers=1,
        ),
    ),
    "unet2d": (
        ClassConditionalUNet2DModel,
        dict(
            block_out_channels=(24, 48),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=12,
            norm_num_groups=8,
        ),
    ),
    "diffit_transformer": (
        DiffiTTransformer2DModel,
        dict(
            patch_size=2, num_layers=5, num_attention_heads=4, attention_head_dim=20, mlp_ratio=2.0, time_proj_dim=64
        ),
    ),
}


def build_contestant(
    name: str, *, num_classes: int, in_channels: int, sample_size: int, class_dropout_prob: float
) -> ModelMixin:
    """A freshly initialised contestant for class-conditional EDM training (no learned variance)."""
    model_cls, config = CONTESTANTS[name]
    config = {**config, "sample_size": sample_size, "in_channels": in_channels, "num_classes": num_classes}
    config["class_dropout_prob"] = class_dropout_prob
    if model_cls is DiffiTTransformer2DModel:
        config["learn_sigma"] = False
    else:
        config["out_channels"] = in_channels
    return model_cls(**config)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def check_parameter_budget(parameters: dict[str, int]) -> None:
    """Raise if the contestants' parameter counts differ by more than ``MAX_PARAMETER_SPREAD`` of the smallest."""
    smallest, largest = min(parameters.values()), max(parameters.values())
    if largest > smallest * (1.0 + MAX_PARAMETER_SPREAD):
        raise ValueError(
            f"Contestant parameter counts {parameters} differ by more than {MAX_PARAMETER_SPREAD:.0%}; resize "
            "the configs in CONTESTANTS so that the comparison is at equal size."
        )


class ContestantTrainer(Trainer):
    """The DiffiT trainer, building contestant ``contestant`` instead of a model from ``config.model_config``."""

    def __init__(self, config: TrainingConfig, contestant: str):
        self.contestant = contestant
        super().__init__(config)

    def build_denoiser(self, *, num_classes: int | None, in_channels: int, sample_size: int) -> ModelMixin:
        if num_classes is None:
            raise ValueError("The quality benchmark trains class-conditionally; set `label_column`.")
        return build_contestant(
            self.contestant,
            num_classes=num_classes,
            in_channels=in_channels,
            sample_size=sample_size,
            class_dropout_prob=self.config.class_dropout_prob,
        )


def training_config(args: argparse.Namespace, dataset_path: Path, output_dir: Path) -> TrainingConfig:
    """The shared training recipe: same data, steps, batch, optimizer, EMA and sampler for every contestant."""
    return TrainingConfig(
        data=DataConfig(
            dataset_name=str(dataset_path),
            label_column="label",
            resolution=RESOLUTION,
            num_channels=1,
            cache_dir=str(Path(args.work_dir) / "hf-cache"),
            seed=args.seed,
        ),
        objective="edm",
        class_dropout_prob=args.class_dropout_prob,
        output_dir=str(output_dir),
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps,
        ema_decay=args.ema_decay,
        checkpointing_steps=args.max_train_steps,
        checkpoints_total_limit=1,
        num_validation_images=1,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        logging_steps=args.max_train_steps,
    )


def train_contestant(name: str, config: TrainingConfig) -> tuple[DiffiTPipeline, dict[str, float]]:
    """Train contestant ``name`` with the DiffiT trainer. Returns the EMA pipeline it saved (on the training device)
    and the wall-clock and process CPU seconds of the training loop, including the trainer's final export of a
    10-image grid. On a shared CPU the CPU seconds are the fairer measure: other processes inflate the wall clock."""
    trainer = ContestantTrainer(config, name)
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    output_dir = trainer.train()
    timing = {
        "training_seconds": time.perf_counter() - wall_started,
        "training_cpu_seconds": time.process_time() - cpu_started,
    }
    denoiser = CONTESTANTS[name][0].from_pretrained(Path(output_dir) / "denoiser")
    pipeline = DiffiTPipeline.from_pretrained(output_dir, denoiser=denoiser).to(trainer.accelerator.device)
    return pipeline, timing


# ------------------------------------------------------------------------------------------------------- evaluation


def read_samples(folder: Path, num_samples: int) -> np.ndarray:
    """The ``{index:06d}.png`` samples written by ``evaluate_pipeline`` as uint8 ``(N, H, W)``."""
    return np.stack([np.asarray(Image.open(folder / f"{index:06d}.png")) for index in range(num_samples)])


def save_class_grid(images: np.ndarray, labels: np.ndarray, path: Path) -> Path:
    """A grid of uint8 images ``(N, H, W)`` with one row per class (the first ``GRID_COLUMNS`` of each) as PNG."""
    rows = []
    for class_id in range(len(CLASS_NAMES)):
        rows += [Image.fromarray(image) for image in images[labels == class_id][:GRID_COLUMNS]]
    columns = len(rows) // len(CLASS_NAMES)
    if columns == 0 or len(rows) != columns * len(CLASS_NAMES):
        raise ValueError(f"A class grid needs as many images (>= 1) of every class; got {len(rows)} images in all.")
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(rows, rows=len(CLASS_NAMES), cols=columns).convert("L").save(path, optimize=True)
    return path


def evaluate_contestant(
    pipeline: DiffiTPipeline,
    judge: FashionClassifier,
    reference: FeatureStatistics,
    real_features: torch.Tensor,
    args: argparse.Namespace,
    samples_dir: Path,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """FD, precision/recall and the judge's Inception Score of ``num_samples`` guided samples with balanced classes,
    plus the judge's class accuracy on them. Returns the metrics, the samples ``(N, H, W)`` and their labels."""
    report = evaluate_pipeline(
        pipeline,
        num_samples=args.num_samples,
        batch_size=args.eval_batch_size,
        extractor=judge_extractor(judge),
        reference=reference,
        real_features=real_features,
        compute_pr=True,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        class_labels="balanced",
        seed=args.seed,
        compute_is=True,
        show_progress=False,
        save_samples_dir=samples_dir,
        is_splits=1,
    )
    samples = read_samples(samples_dir, args.num_samples)
    labels = class_labels_for_samples("balanced", len(CLASS_NAMES), args.num_samples).numpy()
    accuracy = (predict(judge, to_unit_tensor(samples)).numpy() == labels).mean()
    metrics = {key: report[key] for key in ("frechet_distance", "precision", "recall", "inception_score")}
    metrics.update(class_accuracy=float(accuracy), sampling_seconds=report["seconds"])
    return metrics, samples, labels


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEBIAN_DATA_DIR), help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--work_dir", default="/tmp/diffit-quality", help="parquet dataset, runs and samples")
    parser.add_argument("--results_dir", default="benchmarks/results", help="where the JSON results go")
    parser.add_argument("--grid_dir", default="docs/benchmarks", help="where the sample grids (PNG) go")
    parser.add_argument("--budget_name", default=None, help="results file suffix (default: <steps>x<batch>)")
    parser.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=list(CONTESTANTS))
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=50)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--class_dropout_prob", type=float, default=0.1)
    parser.add_argument("--num_samples", type=int, default=300, help="guided samples per contestant")
    parser.add_argument("--eval_batch_size", type=int, default=100)
    parser.add_argument("--num_inference_steps", type=int, default=16)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--judge_epochs", type=int, default=2)
    parser.add_argument("--judge_batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    positive = (
        "max_train_steps",
        "train_batch_size",
        "num_inference_steps",
        "eval_batch_size",
        "judge_epochs",
        "judge_batch_size",
    )
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_samples < 4 * len(CLASS_NAMES):
        parser.error(f"--num_samples must be at least {4 * len(CLASS_NAMES)} (4 per class), got {args.num_samples}.")
    if args.guidance_scale <= 1.0:
        parser.error(f"--guidance_scale must be > 1 (the benchmark scores guided samples), got {args.guidance_scale}.")
    if not 0.0 < args.class_dropout_prob < 1.0:
        parser.error(f"--class_dropout_prob must be in (0, 1), got {args.class_dropout_prob}.")
    if len(set(args.contestants)) != len(args.contestants):
        parser.error(f"--contestants lists a model twice: {args.contestants}.")
    return args


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, one row per contestant and one for real training images."""
    lines = [
        "| Model | Parameters | Training CPU time (wall) | FD ↓ | Precision ↑ | Recall ↑ | Class accuracy ↑ "
        "| Judge IS ↑ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["contestants"].items():
        lines.append(
            f"| `{name}` ({row['model_class']}) | {row['parameters'] / 1e3:.0f}K "
            f"| {row['training_cpu_seconds'] / 60:.1f} min ({row['training_seconds'] / 60:.1f} min) "
            f"| {row['frechet_distance']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} "
            f"| {row['class_accuracy']:.3f} | {row['inception_score']:.2f} |"
        )
    real = results["real_data"]
    lines.append(
        f"| real training images | | | {real['frechet_distance']:.2f} | {real['precision']:.3f} "
        f"| {real['recall']:.3f} "
        f"| {real['class_accuracy']:.3f} | {real['inception_score']:.2f} |"
    )
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Data, judge, every contestant; returns the results written to ``results_dir``."""
    work_dir, grid_dir = Path(args.work_dir), Path(args.grid_dir)
    train_images, train_labels = load_fashion_mnist(args.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(args.data_dir, "test")
    dataset_path = write_parquet_dataset(train_images, train_labels, work_dir / "fashion-mnist-train.parquet")

    started = time.perf_counter()
    judge = train_judge(
        to_unit_tensor(train_images),
        torch.from_numpy(train_labels),
        epochs=args.judge_epochs,
        batch_size=args.judge_batch_size,
        seed=args.seed,
    )
    judge_seconds = time.perf_counter() - started
    test_tensor = to_unit_tensor(test_images)
    judge_accuracy = float((predict(judge, test_tensor).numpy() == test_labels).mean())
    extractor = judge_extractor(judge)
    test_features = torch.cat([extractor(batch) for batch in test_tensor.split(1000)])
    reference = FeatureStatistics.from_features(test_features)
    pick = torch.Generator().manual_seed(args.seed)
    real_features = test_features[torch.randperm(len(test_features), generator=pick)[: args.num_samples]]

    real_indices = torch.randperm(len(train_images), generator=pick)[: args.num_samples].numpy()
    real_images = train_images[real_indices]
    real_report = evaluate_samples(
        to_unit_tensor(real_images).split(args.eval_batch_size),
        extractor,
        reference,
        real_features=real_features,
        compute_pr=True,
        compute_is=True,
        is_splits=1,
    )
    real_data = {key: real_report[key] for key in ("frechet_distance", "precision", "recall", "inception_score")}
    real_labels = train_labels[real_indices]
    real_data["class_accuracy"] = float((predict(judge, to_unit_tensor(real_images)).numpy() == real_labels).mean())
    real_data["grid"] = str(save_class_grid(real_images, real_labels, grid_dir / "quality-real.png"))

    parameters = {
        name: count_parameters(
            build_contestant(
                name, num_classes=len(CLASS_NAMES), in_channels=1, sample_size=RESOLUTION, class_dropout_prob=0.1
            )
        )
        for name in args.contestants
    }
    check_parameter_budget(parameters)
    contestants = {}
    for name in args.contestants:
        run_dir = work_dir / "runs" / name
        pipeline, timing = train_contestant(name, training_config(args, dataset_path, run_dir))
        metrics, samples, labels = evaluate_contestant(
            pipeline, judge, reference, real_features, args, work_dir / "samples" / name
        )
        contestants[name] = {
            "model_class": CONTESTANTS[name][0].__name__,
            "config": json.loads(pipeline.denoiser.to_json_string()),
            "parameters": parameters[name],
            **timing,
            "cpu_seconds_per_step": timing["training_cpu_seconds"] / args.max_train_steps,
            **metrics,
            "grid": str(save_class_grid(samples, labels, grid_dir / f"quality-{name}.png")),
        }
        print(f"{name}: {json.dumps({k: v for k, v in contestants[name].items() if k != 'config'})}", flush=True)

    results = {
        "command": command,
        "settings": {key: value for key, value in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "judge": {
            "test_accuracy": judge_accuracy,
            "training_seconds": judge_seconds,
            "parameters": count_parameters(judge),
            "feature_dim": test_features.shape[1],
        },
        "real_data": real_data,
        "contestants": contestants,
    }
    budget_name = args.budget_name or f"{args.max_train_steps}x{args.train_batch_size}"
    results_path = Path(args.results_dir) / f"quality-{budget_name}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    results["results_path"] = str(results_path)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality.py", *argv])
    results = run_benchmark(args, command)
    print(f"Judge test accuracy: {results['judge']['test_accuracy']:.3f}")
    print(markdown_table(results))
    print(f"Results: {results['results_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
