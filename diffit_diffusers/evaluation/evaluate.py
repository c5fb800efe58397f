"""One-pass evaluation of generated samples against reference statistics, and the checks and report it shares with
``evaluate_pipeline``."""

from typing import Any, Dict, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .feature_extractors import FeatureExtractor
from .metrics import inception_score, precision_recall
from .statistics import FeatureReservoir, FeatureStatistics


def check_feature_dim(features: torch.Tensor, reference: FeatureStatistics) -> None:
    """Raises a ``ValueError`` unless ``features`` ``(N, D)`` have the dimension of ``reference``."""
    if features.shape[1] != reference.dim:
        raise ValueError(
            f"The extractor produces {features.shape[1]}-d features but `reference` has dimension {reference.dim}; "
            "both must come from the same feature extractor."
        )


def check_evaluation_inputs(
    extractor: FeatureExtractor,
    reference: FeatureStatistics,
    compute_is: bool,
    real_features_for_pr: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """
    Validates the arguments that ``evaluate_samples`` and ``evaluate_pipeline`` share.

    Args:
        extractor (FeatureExtractor): must be a ``FeatureExtractor`` that provides logits when ``compute_is`` is set.
        reference (FeatureStatistics): must hold at least one sample.
        compute_is (bool): whether the Inception Score is requested.
        real_features_for_pr (torch.Tensor, optional): real features ``(N_real, D)`` with the dimension of
            ``reference``.

    Returns:
        ``real_features_for_pr`` as a tensor, or ``None`` when not given.
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(
            "`extractor` must be a FeatureExtractor (wrap plain modules with ModuleFeatureExtractor, or use "
            f"build_feature_extractor), got {type(extractor).__name__}."
        )
    if not isinstance(reference, FeatureStatistics):
        raise TypeError(f"`reference` must be FeatureStatistics, got {type(reference).__name__}.")
    if reference.dim is None or reference.count == 0:
        raise ValueError("`reference` statistics are empty.")
    if compute_is and not extractor.provides_logits:
        raise ValueError(
            f"`compute_is=True` needs class logits but extractor {extractor.name!r} provides none; use "
            "InceptionFeatureExtractor or ModuleFeatureExtractor(..., layer=..., output_is_logits=True)."
        )
    if real_features_for_pr is None:
        return None
    real_features_for_pr = torch.as_tensor(real_features_for_pr)
    if real_features_for_pr.ndim != 2:
        raise ValueError(f"`real_features_for_pr` must have shape (N, D), got {tuple(real_features_for_pr.shape)}.")
    check_feature_dim(real_features_for_pr, reference)
    return real_features_for_pr


def build_metrics_report(
    extractor: FeatureExtractor,
    statistics: FeatureStatistics,
    reference: FeatureStatistics,
    *,
    real_features: Optional[torch.Tensor] = None,
    fake_features: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    k: int = 3,
    pr_batch_size: int = 4096,
    is_splits: int = 10,
) -> Dict[str, Any]:
    """
    The metrics of generated samples, as ``evaluate_samples`` and ``evaluate_pipeline`` report them.

    Args:
        extractor (FeatureExtractor): the extractor that produced all features.
        statistics (FeatureStatistics): statistics of the generated samples.
        reference (FeatureStatistics): statistics of the real images.
        real_features (torch.Tensor, optional): real features ``(N_real, D)``; with ``fake_features``, precision and
            recall are computed on the device of ``real_features``.
        fake_features (torch.Tensor, optional): features ``(N_fake, D)`` of (a subset of) the generated samples.
        logits (torch.Tensor, optional): class logits ``(N, num_classes)`` of the generated samples; when given, the
            Inception Score is computed.
        k (int): neighbourhood size of precision/recall.
        pr_batch_size (int): block size of the precision/recall pairwise distances.
        is_splits (int): chunks of the Inception Score.

    Returns:
        The JSON-serialisable report described under Returns of ``evaluate_samples``.
    """
    distance = statistics.frechet_distance(reference)
    report: Dict[str, Any] = {
        "feature_extractor": extractor.name,
        "num_samples": statistics.count,
        "reference_num_samples": reference.count,
        "frechet_distance": distance,
    }
    if extractor.computes_standard_fid:
        report["fid"] = distance
    if real_features is not None:
        scores = precision_recall(real_features, fake_features, k=k, batch_size=pr_batch_size)
        report.update(
            precision=scores.precision,
            recall=scores.recall,
            precision_recall_k=k,
            precision_recall_num_real=real_features.shape[0],
            precision_recall_num_fake=fake_features.shape[0],
        )
    if logits is not None:
        score_mean, score_std = inception_score(logits, splits=is_splits, input_type="logits")
        report.update(inception_score=score_mean, inception_score_std=score_std)
    return report


def evaluate_samples(
    sample_batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    reference: FeatureStatistics,
    *,
    real_features_for_pr: Optional[torch.Tensor] = None,
    compute_is: bool = False,
    max_pr_samples: int = 10000,
    k: int = 3,
    pr_batch_size: int = 4096,
    is_splits: int = 10,
    seed: int = 0,
    show_progress: bool = False,
) -> Dict[str, Any]:
    """
    Evaluates generated images in one streaming pass: only feature statistics, a reservoir of at most
    ``max_pr_samples`` features (for precision/recall) and, with ``compute_is``, the class logits are kept.

    Args:
        sample_batches (Iterable[torch.Tensor]): batches ``(B, C, H, W)``, uint8 or float in [0, 1] (map [-1, 1]
            model outputs with ``(x + 1) / 2``).
        extractor (FeatureExtractor): the same extractor that produced ``reference``.
        reference (FeatureStatistics): statistics of the real images.
        real_features_for_pr (torch.Tensor, optional): real features ``(N_real, D)``; when given, precision and
            recall are computed against a uniform random subset of the sample features.
        compute_is (bool): compute the Inception Score from the extractor's logits.
        max_pr_samples (int): number of sample features kept (reservoir sampling) for precision/recall.
        k (int): neighbourhood size of precision/recall.
        pr_batch_size (int): block size of the precision/recall pairwise distances.
        is_splits (int): chunks of the Inception Score.
        seed (int): seed of the reservoir sampling.
        show_progress (bool): show a progress bar.

    Returns:
        A JSON-serialisable report with ``feature_extractor``, ``num_samples``, ``reference_num_samples`` and
            ``frechet_distance`` (also under ``fid`` when the extractor is the standard FID Inception network), and,
            when requested, ``precision``, ``recall``, ``precision_recall_k``, ``precision_recall_num_real``,
            ``precision_recall_num_fake``, ``inception_score`` and ``inception_score_std``.
    """
    real_features_for_pr = check_evaluation_inputs(extractor, reference, compute_is, real_features_for_pr)
    reservoir = None if real_features_for_pr is None else FeatureReservoir(max_pr_samples, seed=seed)

    statistics = FeatureStatistics(dim=reference.dim)
    logits = []
    with tqdm(unit="img", desc="Evaluating samples", disable=not show_progress) as progress:
        for images in sample_batches:
            output = extractor.extract(images)
            check_feature_dim(output.features, reference)
            statistics.update(output.features)
            if reservoir is not None:
                reservoir.add(output.features)
            if compute_is:
                logits.append(output.logits.cpu())
            progress.update(output.features.shape[0])
    if statistics.count < 2:
        raise ValueError(f"Need at least 2 samples to evaluate, got {statistics.count}.")

    return build_metrics_report(
        extractor,
        statistics,
        reference,
        real_features=real_features_for_pr,
        fake_features=None if reservoir is None else reservoir.features,
        logits=torch.cat(logits) if compute_is else None,
        k=k,
        pr_batch_size=pr_batch_size,
        is_splits=is_splits,
    )
