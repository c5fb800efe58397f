"""Sample-quality metrics computed from features: Frechet distance, Inception Score, k-NN precision/recall."""

from typing import NamedTuple, Tuple, Union

import numpy as np
import torch


ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_float64_array(value: ArrayLike, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return array


def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix; rounding-level negative eigenvalues become 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """
    Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    The trace of the matrix square root is computed as the sum of square roots of the eigenvalues of the symmetric
    positive semi-definite matrix ``sigma1^(1/2) sigma2 sigma1^(1/2)`` (which has the same spectrum as
    ``sigma1 sigma2``). Unlike ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` this needs no epsilon offset for singular
    covariances (fewer samples than feature dimensions) and never produces imaginary parts.

    Args:
        mu1 (np.ndarray or torch.Tensor): mean ``(D,)`` of the first set.
        sigma1 (np.ndarray or torch.Tensor): symmetric covariance ``(D, D)`` of the first set.
        mu2 (np.ndarray or torch.Tensor): mean ``(D,)`` of the second set.
        sigma2 (np.ndarray or torch.Tensor): symmetric covariance ``(D, D)`` of the second set.

    Returns:
        The distance (>= 0).
    """
    mu1, mu2 = _as_float64_array(mu1, "mu1"), _as_float64_array(mu2, "mu2")
    sigma1, sigma2 = _as_float64_array(sigma1, "sigma1"), _as_float64_array(sigma2, "sigma2")
    for mu, sigma, index in ((mu1, sigma1, 1), (mu2, sigma2, 2)):
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"Expected mu{index} of shape (D,) and sigma{index} of shape (D, D), got {mu.shape} and {sigma.shape}."
            )
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"The two statistics have different feature dimensions ({mu1.shape[0]} vs {mu2.shape[0]}); they must "
            "come from the same feature extractor."
        )
    sqrt_sigma1 = _symmetric_psd_sqrt(sigma1)
    product = sqrt_sigma1 @ ((sigma2 + sigma2.T) / 2) @ sqrt_sigma1
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    difference = mu1 - mu2
    distance = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product
    # The distance is non-negative; only rounding can push it (by ~1e-12 relative) below zero.
    return float(max(distance, 0.0))


def inception_score(logits_or_probs: ArrayLike, splits: int = 10, input_type: str = "auto") -> Tuple[float, float]:
    """
    Inception Score ``exp(E_x KL(p(y|x) || p(y)))``, averaged over ``splits`` contiguous chunks of the samples.

    Args:
        logits_or_probs (np.ndarray or torch.Tensor): class logits or probabilities ``(N, num_classes)``.
        splits (int): number of chunks; the score is computed per chunk (the 50K-sample convention uses 10 chunks of
            5K).
        input_type (str): ``"logits"`` (softmax is applied), ``"probabilities"``, or ``"auto"``, which treats the
            input as probabilities when every row is non-negative and sums to 1.

    Returns:
        The mean and the (population) standard deviation of the per-chunk scores.
    """
    values = torch.as_tensor(_as_float64_array(logits_or_probs, "logits_or_probs"))
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(
            f"Expected logits or probabilities of shape (N, num_classes >= 2), got {tuple(values.shape)}."
        )
    if not isinstance(splits, int) or splits < 1:
        raise ValueError(f"`splits` must be a positive integer, got {splits!r}.")
    if values.shape[0] < splits:
        raise ValueError(f"Need at least `splits`={splits} samples, got {values.shape[0]}.")
    if input_type not in ("auto", "logits", "probabilities"):
        raise ValueError(f"`input_type` must be 'auto', 'logits' or 'probabilities', got {input_type!r}.")
    looks_like_probabilities = bool(
        (values >= 0).all() and torch.allclose(values.sum(dim=1), torch.ones(1, dtype=values.dtype), atol=1e-4)
    )
    if input_type == "probabilities" and not looks_like_probabilities:
        raise ValueError("`input_type='probabilities'` but the rows are not non-negative and summing to 1.")
    if input_type == "logits" or (input_type == "auto" and not looks_like_probabilities):
        probabilities = torch.softmax(values, dim=1)
    else:
        probabilities = values / values.sum(dim=1, keepdim=True)

    scores = []
    for chunk in torch.tensor_split(probabilities, splits):
        marginal = chunk.mean(dim=0, keepdim=True)
        kl_divergence = (torch.xlogy(chunk, chunk) - torch.xlogy(chunk, marginal)).sum(dim=1)
        scores.append(torch.exp(kl_divergence.mean()))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


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
