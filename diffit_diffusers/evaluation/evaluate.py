"""One-pass evaluation of generated samples against reference statistics."""

from typing import Any, Dict, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .feature_extractors import FeatureExtractor
from .metrics import inception_score, precision_recall
from .statistics import FeatureReservoir, FeatureStatistics


def _check_feature_dim(features: torch.Tensor, expected: Optional[int], what: str) -> None:
    if expected is not None and features.shape[1] != expected:
        raise ValueError(
            f"The extractor produces {features.shape[1]}-d features but {what} has dimension {expected}; both must "
            "come from the same feature extractor."
        )


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
    `max_pr_samples` features (for precision/recall) and, with `compute_is`, the class logits are kept.

    Args:
        sample_batches (`Iterable[torch.Tensor]`): batches `(B, C, H, W)`, uint8 or float in [0, 1] (map [-1, 1]
            model outputs with `(x + 1) / 2`).
        extractor ([`FeatureExtractor`]): the same extractor that produced `reference`.
        reference ([`FeatureStatistics`]): statistics of the real images.
        real_features_for_pr (`torch.Tensor` of shape `(N_real, D)`, *optional*): real features; when given,
            precision and recall are computed against a uniform random subset of the sample features.
        compute_is (`bool`, defaults to `False`): compute the Inception Score from the extractor's logits.
        max_pr_samples (`int`, defaults to 10000): number of sample features kept (reservoir sampling) for P/R.
        k (`int`, defaults to 3): neighbourhood size of precision/recall.
        pr_batch_size (`int`, defaults to 4096): block size of the P/R pairwise distances.
        is_splits (`int`, defaults to 10): chunks of the Inception Score.
        seed (`int`, defaults to 0): seed of the reservoir sampling.
        show_progress (`bool`, defaults to `False`): show a progress bar.

    Returns:
        `dict` (JSON-serialisable) with `feature_extractor`, `num_samples`, `reference_num_samples`,
        `frechet_distance` (also under `fid` when the extractor is the standard FID Inception network), and, when
        requested, `precision`, `recall`, `precision_recall_k`, `precision_recall_num_real`,
        `precision_recall_num_fake`, `inception_score`, `inception_score_std`.
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(
            f"`extractor` must be a FeatureExtractor (wrap plain modules with ModuleFeatureExtractor), got "
            f"{type(extractor).__name__}."
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
    reservoir = None
    if real_features_for_pr is not None:
        real_features_for_pr = torch.as_tensor(real_features_for_pr)
        if real_features_for_pr.ndim != 2:
            raise ValueError(
                f"`real_features_for_pr` must have shape (N, D), got {tuple(real_features_for_pr.shape)}."
            )
        _check_feature_dim(real_features_for_pr, reference.dim, "`reference`")
        reservoir = FeatureReservoir(max_pr_samples, seed=seed)

    statistics = FeatureStatistics(dim=reference.dim)
    logits = []
    with tqdm(unit="img", desc="Evaluating samples", disable=not show_progress) as progress:
        for images in sample_batches:
            output = extractor.extract(images)
            _check_feature_dim(output.features, reference.dim, "`reference`")
            statistics.update(output.features)
            if reservoir is not None:
                reservoir.add(output.features)
            if compute_is:
                logits.append(output.logits.cpu())
            progress.update(output.features.shape[0])
    if statistics.count < 2:
        raise ValueError(f"Need at least 2 samples to evaluate, got {statistics.count}.")

    distance = statistics.frechet_distance(reference)
    report: Dict[str, Any] = {
        "feature_extractor": extractor.name,
        "num_samples": statistics.count,
        "reference_num_samples": reference.count,
        "frechet_distance": distance,
    }
    if extractor.computes_standard_fid:
        report["fid"] = distance
    if reservoir is not None:
        fake_features = reservoir.features
        scores = precision_recall(real_features_for_pr, fake_features, k=k, batch_size=pr_batch_size)
        report.update(
            precision=scores.precision,
            recall=scores.recall,
            precision_recall_k=k,
            precision_recall_num_real=real_features_for_pr.shape[0],
            precision_recall_num_fake=fake_features.shape[0],
        )
    if compute_is:
        score_mean, score_std = inception_score(torch.cat(logits), splits=is_splits, input_type="logits")
        report.update(inception_score=score_mean, inception_score_std=score_std)
    return report
