"""Sample-quality metrics computed from features: KID and Inception Score by torchmetrics, k-NN precision/recall."""

import warnings
from typing import NamedTuple, Tuple, Union

import numpy as np
import torch

from .statistics import FeatureInput, import_torchmetrics_image, validate_features


ArrayLike = Union[np.ndarray, torch.Tensor]
# torchmetrics warns that KID and IS keep every feature; callers here pass bounded feature sets.
_FEATURE_BUFFER_WARNING = ".*will save all extracted features in buffer"


def kernel_inception_distance(
    real_features: ArrayLike, fake_features: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> Tuple[float, float, int]:
    """Kernel Inception Distance (Binkowski et al., 2018) by torchmetrics' ``KernelInceptionDistance``.

    The unbiased MMD^2 estimate with the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over
    ``subsets`` random subsets of ``subset_size`` rows of each set, drawn from a generator seeded with ``seed``.

    Args:
        real_features (np.ndarray or torch.Tensor): features ``(N_real, D)`` of real images.
        fake_features (np.ndarray or torch.Tensor): features ``(N_fake, D)`` of generated images.
        subsets (int): number of subsets.
        subset_size (int): rows per subset; reduced to ``min(N_real, N_fake)`` when larger.
        seed (int): seed of the subset draws.

    Returns:
        The mean and the (population) standard deviation over the subsets, and the subset size used.
    """
    KernelInceptionDistance = import_torchmetrics_image("kid").KernelInceptionDistance
    real = validate_features(real_features, None)
    fake = validate_features(fake_features, real.shape[1])
    subset_size = min(subset_size, real.shape[0], fake.shape[0])
    if subset_size < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated features, got {real.shape[0]} and {fake.shape[0]}.")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FEATURE_BUFFER_WARNING, category=UserWarning)
        metric = KernelInceptionDistance(
            feature=FeatureInput(real.shape[1]), subsets=subsets, subset_size=subset_size, sync_on_compute=False
        )
    metric.update(real, real=True)
    metric.update(fake.to(real.device), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), subset_size


def inception_score(logits: ArrayLike, splits: int = 10, seed: int = 0) -> Tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` by torchmetrics' ``InceptionScore``.

    The samples are shuffled with a generator seeded with ``seed`` and scored in ``splits`` chunks.

    Args:
        logits (np.ndarray or torch.Tensor): class logits ``(N, num_classes)``.
        splits (int): number of chunks (the 50K-sample convention uses 10 chunks of 5K).
        seed (int): seed of the shuffle.

    Returns:
        The mean and the (unbiased) standard deviation of the per-chunk scores; the deviation is ``nan`` for one chunk.
    """
    InceptionScore = import_torchmetrics_image("inception").InceptionScore
    logits = validate_features(logits, None)
    if logits.shape[1] < 2:
        raise ValueError(f"Expected logits of shape (N, num_classes >= 2), got {tuple(logits.shape)}.")
    if not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"`splits` must be an integer in [1, {logits.shape[0]}] (the sample count), got {splits!r}.")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FEATURE_BUFFER_WARNING, category=UserWarning)
        metric = InceptionScore(feature=FeatureInput(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="std\\(\\): degrees of freedom", category=UserWarning)
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


class PrecisionRecall(NamedTuple):
    """Improved precision (fraction of fakes on the real manifold) and recall (fraction of reals on the fake one)."""

    precision: float
    recall: float


def _kth_neighbour_distances(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance ``(N,)`` from each row of ``features`` ``(N, D)`` to its k-th nearest other row, computed in
    ``(batch, batch)`` blocks so memory stays bounded."""
    radii = torch.empty(features.shape[0], dtype=features.dtype, device=features.device)
    for row_start in range(0, features.shape[0], batch_size):
        rows = features[row_start : row_start + batch_size]
        nearest = None
        for column_start in range(0, features.shape[0], batch_size):
            distances = torch.cdist(rows, features[column_start : column_start + batch_size])
            candidates = distances if nearest is None else torch.cat([nearest, distances], dim=1)
            # The k+1 smallest distances include the point itself (distance 0) at position 0.
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii[row_start : row_start + batch_size] = nearest[:, k]
    return radii


def _fraction_inside_manifold(
    queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> float:
    """Fraction of ``queries`` that lie within ``radii[i]`` of some ``manifold[i]`` (k-NN balls)."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for row_start in range(0, queries.shape[0], batch_size):
        rows = queries[row_start : row_start + batch_size]
        for column_start in range(0, manifold.shape[0], batch_size):
            distances = torch.cdist(rows, manifold[column_start : column_start + batch_size])
            within = (distances <= radii[None, column_start : column_start + batch_size]).any(dim=1)
            inside[row_start : row_start + batch_size] |= within
    return float(inside.float().mean())


def precision_recall(
    real_features: ArrayLike, fake_features: ArrayLike, k: int = 3, batch_size: int = 4096
) -> PrecisionRecall:
    """
    Improved precision and recall (Kynkaanniemi et al., 2019): each feature set's manifold is the union of balls
    around its points with radius the distance to the k-th nearest neighbour in the same set.

    Distances are computed with ``torch.cdist`` in ``(batch_size, batch_size)`` blocks on the device of
    ``real_features``, in float32 (float64 when both inputs are float64).

    Args:
        real_features (torch.Tensor or np.ndarray): features ``(N_real, D)`` of real images.
        fake_features (torch.Tensor or np.ndarray): features ``(N_fake, D)`` of generated images.
        k (int): neighbourhood size.
        batch_size (int): block size of the pairwise distance computation.

    Returns:
        The ``(precision, recall)`` pair, each in [0, 1].
    """
    real = torch.as_tensor(real_features)
    fake = torch.as_tensor(fake_features)
    for features, name in ((real, "real_features"), (fake, "fake_features")):
        if features.ndim != 2:
            raise ValueError(f"`{name}` must have shape (N, D), got {tuple(features.shape)}.")
        if not torch.isfinite(features).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"Real and fake features have different dimensions ({real.shape[1]} vs {fake.shape[1]}); they must come "
            "from the same feature extractor."
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"Need more than k={k} samples in each set, got {real.shape[0]} real and {fake.shape[0]} fake."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    dtype = torch.float64 if real.dtype == fake.dtype == torch.float64 else torch.float32
    real = real.to(dtype)
    fake = fake.to(device=real.device, dtype=dtype)

    real_radii = _kth_neighbour_distances(real, k, batch_size)
    fake_radii = _kth_neighbour_distances(fake, k, batch_size)
    precision = _fraction_inside_manifold(fake, real, real_radii, batch_size)
    recall = _fraction_inside_manifold(real, fake, fake_radii, batch_size)
    return PrecisionRecall(precision=precision, recall=recall)
