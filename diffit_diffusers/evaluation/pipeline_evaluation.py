"""Sampling-based evaluation of a pipeline (optionally across ``accelerate`` processes) and CLI feature extractors."""

import os
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils import seeded_generator
from .evaluate import build_metrics_report, check_evaluation_inputs
from .feature_extractors import FeatureExtractor, InceptionFeatureExtractor, ModuleFeatureExtractor
from .statistics import FeatureStatistics, frechet_distance_metric, validate_features


ClassLabels = Union[str, Sequence[int], None]
CLASS_LABEL_MODES = ("balanced", "random")
MODULE_SPEC_PREFIX = "module:"
# ITU-R BT.601 luma weights, as PIL uses for RGB -> "L".
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------------------------------------- channels


def extractor_input_channels(extractor: FeatureExtractor) -> Optional[int]:
    """
    Number of image channels ``extractor`` takes, or ``None`` when it cannot be told (then images are passed
    unchanged).

    Inception-v3 takes RGB. For a ``ModuleFeatureExtractor`` without ``preprocess`` it is the input channels of the
    first 4-d weight (the first convolution) of the wrapped module.
    """
    if isinstance(extractor, InceptionFeatureExtractor):
        return 3
    if isinstance(extractor, ModuleFeatureExtractor) and extractor.preprocess is None:
        return _module_input_channels(extractor.module)
    return None


def _module_input_channels(module: torch.nn.Module) -> Optional[int]:
    """Input channels of the first 4-d weight (the first convolution) of ``module``, ``None`` if it has none."""
    for parameter in module.parameters():
        if parameter.ndim == 4:
            return parameter.shape[1]
    return None


def match_channels(images: torch.Tensor, num_channels: Optional[int]) -> torch.Tensor:
    """
    Converts grayscale to RGB (repeated channel) or RGB to grayscale (BT.601 luma) so that images fit an extractor.

    Args:
        images (torch.Tensor): uint8 or float images ``(B, C, H, W)``.
        num_channels (int, optional): channels the extractor takes; ``None`` or ``C`` leaves the images unchanged.

    Returns:
        The images ``(B, num_channels, H, W)``, with the dtype of ``images``.
    """
    channels = images.shape[1]
    if num_channels is None or channels == num_channels:
        return images
    if channels == 1 and num_channels == 3:
        return images.expand(-1, 3, -1, -1)
    if channels == 3 and num_channels == 1:
        weights = torch.tensor(_LUMA_WEIGHTS, device=images.device).view(1, 3, 1, 1)
        gray = (images.float() * weights).sum(dim=1, keepdim=True)
        return gray.round().to(torch.uint8) if images.dtype == torch.uint8 else gray.to(images.dtype)
    raise ValueError(
        f"Cannot feed {channels}-channel images to a feature extractor that takes {num_channels} channels; only "
        "grayscale <-> RGB conversions are supported."
    )


# ------------------------------------------------------------------------------------------------ feature extractors


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def load_module_file(path: Union[str, os.PathLike]) -> torch.nn.Module:
    """
    Loads a full ``torch.nn.Module`` from a TorchScript archive (``torch.jit.save``) or a ``torch.save(module)`` file.

    Plain ``torch.save`` files are unpickled with ``weights_only=False``, which can run arbitrary code: only pass files
    you trust. The module class of such a file must be importable.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Feature extractor file {os.fspath(path)!r} does not exist.")
    is_torchscript = _is_torchscript_archive(path)
    try:
        if is_torchscript:
            module = torch.jit.load(os.fspath(path), map_location="cpu")
        else:
            module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(
            f"Could not load a module from {os.fspath(path)!r} ({type(error).__name__}: {error}). Save the full "
            "module with `torch.jit.save(torch.jit.script(model), path)` or `torch.save(model, path)` (its class must "
            "be importable when loading)."
        ) from error
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"{os.fspath(path)!r} holds a {type(module).__name__}, not a torch.nn.Module (a state dict?). Save the "
            "full module with `torch.save(model, path)` or `torch.jit.save(torch.jit.script(model), path)`."
        )
    return module


def build_feature_extractor(
    spec: str,
    *,
    weights_path: Optional[Union[str, os.PathLike]] = None,
    feature_layer: Optional[str] = None,
    output_is_logits: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> FeatureExtractor:
    """
    Builds a feature extractor from a command-line spec.

    Args:
        spec (str): ``"inception"`` for the standard FID Inception-v3 (``InceptionFeatureExtractor``, needs
            torch-fidelity), or ``"module:PATH"`` for a network saved at ``PATH`` with ``torch.jit.save`` or
            ``torch.save(model)`` (loaded with ``weights_only=False``, so only use files you trust). Grayscale or RGB
            images are converted to the channel count of the module's first convolution.
        weights_path (str or os.PathLike, optional): local Inception weights file (only with ``"inception"``).
        feature_layer (str, optional): with ``"module:PATH"``, dotted name of the submodule whose output are the
            features (e.g. a classifier's penultimate layer); by default the module's output are the features. Not
            available for TorchScript files.
        output_is_logits (bool): with ``feature_layer``, use the module's output as class logits
            (for the Inception Score).
        device (str or torch.device): where the extractor runs.
    """
    if not isinstance(spec, str):
        raise TypeError(f"The feature extractor spec must be a string, got {type(spec).__name__}.")
    if spec == "inception":
        if feature_layer is not None or output_is_logits:
            raise ValueError(
                "`feature_layer` and `output_is_logits` only apply to 'module:PATH' extractors; Inception-v3 always "
                "uses its 2048-d pool features and its class logits."
            )
        return InceptionFeatureExtractor(weights_path).to(device)
    if not spec.startswith(MODULE_SPEC_PREFIX) or spec == MODULE_SPEC_PREFIX:
        raise ValueError(
            f"Unknown feature extractor {spec!r}; use 'inception' or '{MODULE_SPEC_PREFIX}PATH' (a module saved with "
            "torch.jit.save or torch.save)."
        )
    if weights_path is not None:
        raise ValueError("`weights_path` (the Inception weights) only applies to the 'inception' extractor.")
    path = Path(spec[len(MODULE_SPEC_PREFIX) :]).expanduser()
    module = load_module_file(path)
    if feature_layer is not None and isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"{os.fspath(path)!r} is a TorchScript module, whose layers cannot be hooked: drop `feature_layer` and "
            "save a module whose forward returns the features, or save the full module with `torch.save(model)`."
        )
    num_channels = _module_input_channels(module)
    name = f"{MODULE_SPEC_PREFIX}{path.name}" + (f":{feature_layer}" if feature_layer else "")
    extractor = ModuleFeatureExtractor(
        module,
        preprocess=None if num_channels is None else lambda images: match_channels(images, num_channels),
        layer=feature_layer,
        output_is_logits=output_is_logits,
        name=name,
    )
    return extractor.to(device)


# ----------------------------------------------------------------------------------------------------- sampling


def class_labels_for_samples(
    class_labels: ClassLabels, num_classes: Optional[int], num_samples: int, seed: int = 0
) -> Optional[torch.Tensor]:
    """
    The class label of every sample index.

    Args:
        class_labels (str or Sequence[int], optional): ``"balanced"`` (sample ``i`` gets class ``i % num_classes``),
            ``"random"`` (uniform classes drawn with ``seed``), or a list of class ids cycled over the samples.
            Unconditional pipelines (``num_classes=None``) accept only ``"balanced"``, ``"random"`` or ``None`` and
            get no labels.
        num_classes (int, optional): number of classes of the pipeline, ``None`` when unconditional.
        num_samples (int): number of samples.
        seed (int): seed of the ``"random"`` labels.

    Returns:
        The labels as a ``torch.LongTensor`` ``(num_samples,)``, or ``None`` for unconditional pipelines.
    """
    is_mode = isinstance(class_labels, str)
    if is_mode and class_labels not in CLASS_LABEL_MODES:
        raise ValueError(
            f"Unknown `class_labels` {class_labels!r}; use 'balanced', 'random' or a list of class ids."
        )
    if num_classes is None:
        if class_labels is not None and not is_mode:
            raise ValueError("The pipeline is unconditional (`num_classes=None`); it takes no `class_labels`.")
        return None
    if class_labels is None:
        raise ValueError(
            f"The pipeline is class-conditional ({num_classes} classes); set `class_labels` to 'balanced', 'random' "
            "or a list of class ids."
        )
    if class_labels == "balanced":
        return torch.arange(num_samples) % num_classes
    if class_labels == "random":
        return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))
    labels = class_labels.tolist() if isinstance(class_labels, (torch.Tensor, np.ndarray)) else list(class_labels)
    if not labels or not all(isinstance(label, (int, np.integer)) and 0 <= label < num_classes for label in labels):
        raise ValueError(
            f"`class_labels` must be a non-empty list of class ids in [0, {num_classes - 1}], got {labels}."
        )
    return torch.tensor(labels, dtype=torch.long).repeat(-(-num_samples // len(labels)))[:num_samples]


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """Rounds float images ``(B, C, H, W)`` in [0, 1] to uint8, as they are stored in PNG files."""
    return (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def save_images(images: torch.Tensor, indices: Sequence[int], folder: Union[str, os.PathLike]) -> None:
    """Writes uint8 images ``(B, C, H, W)`` with 1 or 3 channels as ``folder/{index:06d}.png``."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Only grayscale or RGB samples can be saved as PNG, got {images.shape[1]} channels.")
    for image, index in zip(images.permute(0, 2, 3, 1).cpu().numpy(), indices):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(Path(folder) / f"{index:06d}.png")


def _gather_rows_by_index(indices: torch.Tensor, rows: torch.Tensor, accelerator) -> torch.Tensor:
    """Collects ``rows`` ``(n, D)`` of every process and orders them by their sample ``indices`` ``(n,)``."""
    if accelerator is not None and accelerator.num_processes > 1:
        device = accelerator.device
        indices = accelerator.gather(accelerator.pad_across_processes(indices.to(device), dim=0, pad_index=-1))
        rows = accelerator.gather(accelerator.pad_across_processes(rows.to(device), dim=0))
        kept = indices >= 0
        indices, rows = indices[kept], rows[kept]
    return rows[indices.argsort()]


def _describe_class_labels(class_labels: ClassLabels, labels: Optional[torch.Tensor]) -> Union[str, List[int], None]:
    if labels is None:
        return None
    return class_labels if isinstance(class_labels, str) else [int(label) for label in list(class_labels)]


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def evaluate_pipeline(
    pipeline,
    *,
    num_samples: int,
    batch_size: int,
    extractor: FeatureExtractor,
    reference: FeatureStatistics,
    real_features: Optional[torch.Tensor] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    guidance_schedule: Optional[str] = None,
    class_labels: ClassLabels = "balanced",
    seed: int = 0,
    accelerator=None,
    compute_pr: bool = False,
    compute_kid: bool = False,
    compute_is: bool = False,
    show_progress: bool = True,
    save_samples_dir: Optional[Union[str, os.PathLike]] = None,
    max_feature_samples: int = 10000,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
) -> Dict[str, Any]:
    """
    Samples ``num_samples`` images from a ``DiffiTPipeline`` in batches and evaluates them against ``reference``,
    streaming: the Frechet distance accumulates in torchmetrics' ``FrechetInceptionDistance``; only the features of
    at most ``max_feature_samples`` samples (for precision/recall and KID) and, with ``compute_is``, the class logits
    are kept.

    Sample ``i`` is drawn from its own generator (seeded from ``seed`` and ``i``) with its own label, so the samples do
    not depend on ``batch_size`` or on the number of processes. Samples are rounded to uint8 (as saved to PNG) before
    the features are computed; 1-channel samples are repeated to RGB for 3-channel extractors (see
    ``match_channels``).
    The pipeline's own per-step progress bar is disabled.

    With an ``accelerate.Accelerator``, every process must call this function: each samples a contiguous share of
    the indices on ``accelerator.device``, torchmetrics sums the Frechet distance state over the processes (the
    reference enters on the main process only), the kept features and logits are gathered in sample order, and the
    main process computes the report, which every process returns.

    Args:
        pipeline (DiffiTPipeline): the pipeline to sample from.
        num_samples (int): number of samples (at least 2 and at least the number of processes).
        batch_size (int): samples per pipeline call on each process.
        extractor (FeatureExtractor): the same extractor that produced ``reference``.
        reference (FeatureStatistics): statistics of the real images.
        real_features (torch.Tensor, optional): real features ``(N_real, D)``, needed by precision/recall and KID,
            which compare them with the features of a random subset of ``max_feature_samples`` samples.
        num_inference_steps (int, optional): sampler steps; ``None`` uses the pipeline's default.
        guidance_scale (float, optional): guidance scale; ``None`` uses the pipeline's default.
        guidance_schedule (str, optional): ``"constant"`` or ``"power_cosine"``; ``None`` uses the pipeline's default.
        class_labels (str or Sequence[int], optional): see ``class_labels_for_samples``.
        seed (int): seed of the samples, the ``"random"`` labels, the kept-feature subset, the KID subsets and the
            Inception Score shuffle.
        accelerator (accelerate.Accelerator, optional): distributes the sampling; the pipeline and the extractor
            are moved to its device. Without it, everything runs where the pipeline and the extractor are.
        compute_pr (bool): compute k-NN precision and recall.
        compute_kid (bool): compute the Kernel Inception Distance.
        compute_is (bool): compute the Inception Score from the extractor's logits.
        show_progress (bool): show a progress bar (on the main process).
        save_samples_dir (str or os.PathLike, optional): also write every sample as ``{index:06d}.png`` here.
        max_feature_samples (int): number of samples whose features are kept for precision/recall and KID.
        k (int): neighbourhood size of precision/recall.
        kid_subsets (int): number of KID subsets.
        kid_subset_size (int): rows per KID subset.
        is_splits (int): chunks of the Inception Score.

    Returns:
        A JSON-serialisable report with the metrics of ``evaluate_samples`` (``feature_extractor``, ``num_samples``,
            ``reference_num_samples``, ``frechet_distance``, ``fid`` for the standard Inception, and when requested
            ``precision``, ``recall``, ``kid``, ``inception_score`` and their companions), the
            sampling settings ``pipeline`` (its path when known), ``num_inference_steps``, ``guidance_scale``,
            ``guidance_schedule``, ``class_labels``, ``seed``, ``batch_size``, ``num_processes``, and the timing
            ``seconds`` and ``samples_per_second``.
    """
    num_processes = 1 if accelerator is None else accelerator.num_processes
    process_index = 0 if accelerator is None else accelerator.process_index
    is_main_process = accelerator is None or accelerator.is_main_process
    _check_positive_int(num_samples, "num_samples", minimum=max(2, num_processes))
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(seed, "seed", minimum=0)
    _check_positive_int(max_feature_samples, "max_feature_samples")
    if num_inference_steps is not None:
        _check_positive_int(num_inference_steps, "num_inference_steps")
    real_features = check_evaluation_inputs(extractor, reference, real_features, compute_pr, compute_kid, compute_is)

    config = pipeline.config
    num_inference_steps = num_inference_steps or config.get("default_num_inference_steps")
    guidance_scale = config.get("default_guidance_scale") if guidance_scale is None else guidance_scale
    guidance_schedule = guidance_schedule or config.get("default_guidance_schedule")
    labels = class_labels_for_samples(class_labels, pipeline.num_classes, num_samples, seed)
    kept_sample_mask = None
    if compute_pr or compute_kid:
        kept = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))[:max_feature_samples]
        kept_sample_mask = torch.zeros(num_samples, dtype=torch.bool)
        kept_sample_mask[kept] = True
    if save_samples_dir is not None:
        Path(save_samples_dir).mkdir(parents=True, exist_ok=True)
    if accelerator is not None:
        pipeline.to(accelerator.device)
        extractor.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    num_channels = extractor_input_channels(extractor)

    start_time = time.perf_counter()
    local_indices = torch.arange(
        process_index * num_samples // num_processes, (process_index + 1) * num_samples // num_processes
    )
    metric = frechet_distance_metric(reference.dim, extractor.device)
    if is_main_process:
        reference.load_into(metric)
    kept_indices, kept_features, logit_batches = [], [], []
    show_progress = show_progress and is_main_process
    with tqdm(total=len(local_indices), unit="img", desc="Sampling", disable=not show_progress) as progress:
        for batch_indices in local_indices.split(batch_size):
            images = pipeline(
                class_labels=None if labels is None else labels[batch_indices].tolist(),
                batch_size=len(batch_indices),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_schedule=guidance_schedule,
                generator=[seeded_generator(seed, index) for index in batch_indices.tolist()],
                output_type="pt",
            ).images
            images = quantize_images(images)
            if save_samples_dir is not None:
                save_images(images, batch_indices.tolist(), save_samples_dir)
            output = extractor.extract(match_channels(images, num_channels))
            metric.update(validate_features(output.features, reference.dim), real=False)
            if kept_sample_mask is not None:
                kept = kept_sample_mask[batch_indices]
                kept_indices.append(batch_indices[kept])
                kept_features.append(output.features[kept.to(output.features.device)].cpu())
            if compute_is:
                logit_batches.append(output.logits.cpu())
            progress.update(len(batch_indices))

    # A collective with several processes: torchmetrics sums every process's state before computing.
    frechet_distance = float(metric.compute())
    fake_features = logits = None
    if kept_sample_mask is not None:
        fake_features = _gather_rows_by_index(
            torch.cat(kept_indices), torch.cat(kept_features).reshape(-1, reference.dim), accelerator
        )
    if compute_is:
        logits = _gather_rows_by_index(local_indices, torch.cat(logit_batches), accelerator)
    seconds = time.perf_counter() - start_time

    report = None
    if is_main_process:
        report = build_metrics_report(
            extractor,
            frechet_distance,
            num_samples,
            reference,
            real_features=None if real_features is None else real_features.to(extractor.device),
            fake_features=fake_features,
            logits=logits,
            compute_pr=compute_pr,
            compute_kid=compute_kid,
            k=k,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            is_splits=is_splits,
            seed=seed,
        )
        report.update(
            pipeline=getattr(pipeline, "name_or_path", None),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            class_labels=_describe_class_labels(class_labels, labels),
            seed=seed,
            batch_size=batch_size,
            num_processes=num_processes,
            seconds=seconds,
            samples_per_second=num_samples / seconds,
        )
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        report = broadcast_object_list([report])[0]
    return report
