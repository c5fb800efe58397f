"""One-pass evaluation of generated samples against reference statistics, and the checks and report it shares with
``evaluate_pipeline``."""

from typing import Any, Dict, Iterable, Optional

import torch
from tqdm.auto import tqdm

from .feature_extractors import FeatureExtractor
from .metrics import inception_score, kernel_inception_distance, precision_recall
from .statistics import FeatureReservoir, FeatureStatistics, frechet_distance_metric, validate_features


def check_evaluation_inputs(
    extractor: FeatureExtractor,
    reference: FeatureStatistics,
    real_features: Optional[torch.Tensor],
    compute_pr: bool,
    compute_kid: bool,
    compute_is: bool,
) -> Optional[torch.Tensor]:
    """Validates the arguments that ``evaluate_samples`` and ``evaluate_pipeline`` share.

    Args:
        extractor (FeatureExtractor): must provide logits when ``compute_is`` is set.
        reference (FeatureStatistics): statistics of the real images.
        real_features (torch.Tensor, optional): real features ``(N_real, D)`` with the dimension of ``reference``;
            required by ``compute_pr`` and ``compute_kid``.
        compute_pr (bool): whether precision/recall is requested.
        compute_kid (bool): whether KID is requested.
        compute_is (bool): whether the Inception Score is requested.

    Returns:
        ``real_features`` as a tensor, or ``None`` when not given.
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(
            "`extractor` must be a FeatureExtractor (wrap plain modules with ModuleFeatureExtractor, or use "
            f"build_feature_extractor), got {type(extractor).__name__}."
        )
    if not isinstance(reference, FeatureStatistics):
        raise TypeError(f"`reference` must be FeatureStatistics, got {type(reference).__name__}.")
    if compute_is and not extractor.provides_logits:
        raise ValueError(
            f"`compute_is=True` needs class logits but extractor {extractor.name!r} provides none; use "
            "InceptionFeatureExtractor or ModuleFeatureExtractor(..., layer=..., output_is_logits=True)."
        )
    if (compute_pr or compute_kid) and real_features is None:
        raise ValueError("`compute_pr` and `compute_kid` need `real_features` (real image features (N, D)).")
    return None if real_features is None else validate_features(real_features, reference.dim)


def build_metrics_report(
    extractor: FeatureExtractor,
    frechet_distance: float,
    num_samples: int,
    reference: FeatureStatistics,
    *,
    real_features: Optional[torch.Tensor] = None,
    fake_features: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    compute_pr: bool = False,
    compute_kid: bool = False,
    k: int = 3,
    pr_batch_size: int = 4096,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    seed: int = 0,
) -> Dict[str, Any]:
    """The metrics of generated samples, as ``evaluate_samples`` and ``evaluate_pipeline`` report them.

    Args:
        extractor (FeatureExtractor): the extractor that produced all features.
        frechet_distance (float): Frechet distance of the samples to ``reference``.
        num_samples (int): number of generated samples.
        reference (FeatureStatistics): statistics of the real images.
        real_features (torch.Tensor, optional): real features ``(N_real, D)`` for precision/recall and KID.
        fake_features (torch.Tensor, optional): features ``(N_fake, D)`` of (a subset of) the generated samples.
        logits (torch.Tensor, optional): class logits ``(N, num_classes)`` of the samples; given, the Inception Score
            is computed.
        compute_pr (bool): compute precision/recall from ``real_features`` and ``fake_features``.
        compute_kid (bool): compute KID from ``real_features`` and ``fake_features``.
        k (int): neighbourhood size of precision/recall.
        pr_batch_size (int): block size of the precision/recall pairwise distances.
        kid_subsets (int): number of KID subsets.
        kid_subset_size (int): rows per KID subset (at most the smaller feature count).
        is_splits (int): chunks of the Inception Score.
        seed (int): seed of the KID subsets and of the Inception Score shuffle.

    Returns:
        The JSON-serialisable report described under Returns of ``evaluate_samples``.
    """
    report: Dict[str, Any] = {
        "feature_extractor": extractor.name,
        "num_samples": num_samples,
        "reference_num_samples": reference.count,
        "frechet_distance": frechet_distance,
    }
    if extractor.computes_standard_fid:
        report["fid"] = frechet_distance
    if compute_pr:
        scores = precision_recall(real_features, fake_features, k=k, batch_size=pr_batch_size)
        report.update(precision=scores.precision, recall=scores.recall, precision_recall_k=k)
    if compute_kid:
        kid, kid_std, subset_size = kernel_inception_distance(
            real_features, fake_features, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        report.update(kid=kid, kid_std=kid_std, kid_subsets=kid_subsets, kid_subset_size=subset_size)
    if compute_pr or compute_kid:
        report.update(num_real_features=real_features.shape[0], num_fake_features=fake_features.shape[0])
    if logits is not None:
        score_mean, score_std = inception_score(logits, splits=is_splits, seed=seed)
        report.update(inception_score=score_mean, inception_score_std=None if is_splits == 1 else score_std)
    return report


def evaluate_samples(
    sample_batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    reference: FeatureStatistics,
    *,
    real_features: Optional[torch.Tensor] = None,
    compute_pr: bool = False,
    compute_kid: bool = False,
    compute_is: bool = False,
    max_feature_samples: int = 10000,
    k: int = 3,
    pr_batch_size: int = 4096,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    seed: int = 0,
    show_progress: bool = False,
) -> Dict[str, Any]:
    """Evaluates generated images in one streaming pass.

    The Frechet distance streams through torchmetrics' ``FrechetInceptionDistance``; only a uniform random subset of
    ``max_feature_samples`` sample features (for precision/recall and KID) and, with ``compute_is``, the class logits
    are kept.

    Args:
        sample_batches (Iterable[torch.Tensor]): batches ``(B, C, H, W)``, uint8 or float in [0, 1] (map [-1, 1]
            model outputs with ``(x + 1) / 2``).
        extractor (FeatureExtractor): the same extractor that produced ``reference``.
        reference (FeatureStatistics): statistics of the real images.
        real_features (torch.Tensor, optional): real features ``(N_real, D)``, needed by precision/recall and KID.
        compute_pr (bool): compute k-NN precision and recall.
        compute_kid (bool): compute the Kernel Inception Distance.
        compute_is (bool): compute the Inception Score from the extractor's logits.
        max_feature_samples (int): number of sample features kept (reservoir sampling) for precision/recall and KID.
        k (int): neighbourhood size of precision/recall.
        pr_batch_size (int): block size of the precision/recall pairwise distances.
        kid_subsets (int): number of KID subsets.
        kid_subset_size (int): rows per KID subset.
        is_splits (int): chunks of the Inception Score.
        seed (int): seed of the reservoir sampling, the KID subsets and the Inception Score shuffle.
        show_progress (bool): show a progress bar.

    Returns:
        A JSON-serialisable report with ``feature_extractor``, ``num_samples``, ``reference_num_samples`` and
            ``frechet_distance`` (also under ``fid`` when the extractor is the standard FID Inception network), and,
            when requested, ``precision``, ``recall``, ``precision_recall_k``, ``kid``, ``kid_std``, ``kid_subsets``,
            ``kid_subset_size``, ``num_real_features``, ``num_fake_features``, ``inception_score`` and
            ``inception_score_std``.
    """
    real_features = check_evaluation_inputs(extractor, reference, real_features, compute_pr, compute_kid, compute_is)
    reservoir = FeatureReservoir(max_feature_samples, seed=seed) if compute_pr or compute_kid else None
    metric = frechet_distance_metric(reference.dim, extractor.device)
    reference.load_into(metric)
    logits = []
    with tqdm(unit="img", desc="Evaluating samples", disable=not show_progress) as progress:
        for images in sample_batches:
            output = extractor.extract(images)
            metric.update(validate_features(output.features, reference.dim), real=False)
            if reservoir is not None:
                reservoir.add(output.features)
            if compute_is:
                logits.append(output.logits.cpu())
            progress.update(output.features.shape[0])
    num_samples = int(metric.fake_features_num_samples)
    if num_samples < 2:
        raise ValueError(f"Need at least 2 samples to evaluate, got {num_samples}.")
    return build_metrics_report(
        extractor,
        float(metric.compute()),
        num_samples,
        reference,
        real_features=real_features,
        fake_features=None if reservoir is None else reservoir.features,
        logits=torch.cat(logits) if compute_is else None,
        compute_pr=compute_pr,
        compute_kid=compute_kid,
        k=k,
        pr_batch_size=pr_batch_size,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        is_splits=is_splits,
        seed=seed,
    )
