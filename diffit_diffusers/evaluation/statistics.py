"""Streaming feature statistics (mean, covariance) and a bounded reservoir of features."""

import os
import zipfile
from typing import Optional, Union

import numpy as np
import torch

from .metrics import frechet_distance


PathLike = Union[str, os.PathLike]


def _validate_features(features: Union[torch.Tensor, np.ndarray], expected_dim: Optional[int]) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"Expected features of shape (N, D), got {tuple(features.shape)}.")
    if expected_dim is not None and features.shape[1] != expected_dim:
        raise ValueError(
            f"Expected features of dimension {expected_dim}, got {features.shape[1]}; all features must come from "
            "the same feature extractor."
        )
    if not torch.isfinite(features).all():
        bad_rows = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(f"{bad_rows} feature rows contain NaN or infinite values (diverged samples?).")
    return features


class FeatureStatistics:
    """
    Mean and covariance of features, accumulated batch by batch in float64.

    Batches are combined with the parallel (Chan et al.) update of the mean and of the centred sum of outer products
    ``M2 = sum_i (x_i - mean)(x_i - mean)^T``, so no sample has to be kept and large feature means cause no
    cancellation. ``covariance`` is the unbiased estimate ``M2 / (count - 1)``, as ``np.cov`` (and the FID references)
    compute it.

    Statistics loaded from a file without a sample count (e.g. the ADM evaluator's reference batches) are final:
    they can be compared but not updated or merged, and their ``count`` is ``None``.

    Args:
        dim (int, optional): feature dimension; inferred from the first batch when omitted. Set it when a process
            may see no samples before ``gather_statistics``.
        device (str or torch.device): where the float64 accumulators live.
    """

    def __init__(self, dim: Optional[int] = None, device: Union[str, torch.device] = "cpu"):
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
        self.device = torch.device(device)
        self._count: Optional[int] = 0
        self._mean: Optional[torch.Tensor] = None
        # Centred sum of outer products while `count` is known; the covariance itself for count-less files.
        self._second_moment: Optional[torch.Tensor] = None
        if dim is not None:
            self._mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
            self._second_moment = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    @classmethod
    def from_features(
        cls, features: Union[torch.Tensor, np.ndarray], device: Union[str, torch.device] = "cpu"
    ) -> "FeatureStatistics":
        """Statistics of one feature matrix ``(N, D)``."""
        statistics = cls(device=device)
        statistics.update(features)
        return statistics

    @classmethod
    def _from_moments(
        cls, count: Optional[int], mean: torch.Tensor, second_moment: torch.Tensor, device: Union[str, torch.device]
    ) -> "FeatureStatistics":
        statistics = cls(device=device)
        statistics._count = count
        statistics._mean = mean.to(device=statistics.device, dtype=torch.float64)
        statistics._second_moment = second_moment.to(device=statistics.device, dtype=torch.float64)
        return statistics

    @property
    def dim(self) -> Optional[int]:
        """Feature dimension, ``None`` before the first batch when not given."""
        return None if self._mean is None else self._mean.shape[0]

    @property
    def count(self) -> Optional[int]:
        """Number of accumulated samples (``None`` for statistics loaded without a count)."""
        return self._count

    def _require_count(self, action: str) -> int:
        if self._count is None:
            raise ValueError(
                f"Cannot {action}: these statistics were loaded without a sample count (e.g. an ADM reference "
                "batch) and are final."
            )
        return self._count

    def _combine(self, count: int, mean: torch.Tensor, second_moment: torch.Tensor) -> None:
        """Adds a group of ``count`` samples with the given mean and centred second moment."""
        if count == 0:
            return
        if self._mean is None:
            self._mean = torch.zeros_like(mean)
            self._second_moment = torch.zeros_like(second_moment)
        total = self._count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._second_moment = (
            self._second_moment + second_moment + torch.outer(delta, delta) * (self._count * count / total)
        )
        self._count = total

    def update(self, features: Union[torch.Tensor, np.ndarray]) -> None:
        """
        Adds a batch of features.

        Args:
            features (torch.Tensor or np.ndarray): finite features ``(N, D)``.
        """
        self._require_count("update statistics")
        features = _validate_features(features, self.dim)
        if features.shape[0] == 0:
            return
        features = features.to(device=self.device, dtype=torch.float64)
        batch_mean = features.mean(dim=0)
        centred = features - batch_mean
        self._combine(features.shape[0], batch_mean, centred.T @ centred)

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Adds the samples summarised by ``other`` (e.g. from another process) in place and returns ``self``."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"Can only merge FeatureStatistics, got {type(other).__name__}.")
        self._require_count("merge statistics")
        other_count = other._require_count("merge statistics")
        if other_count == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(
                f"Cannot merge statistics of dimension {other.dim} into statistics of dimension {self.dim}."
            )
        self._combine(other_count, other._mean.to(self.device), other._second_moment.to(self.device))
        return self

    @property
    def mean(self) -> np.ndarray:
        """Feature mean, float64 array of shape ``(D,)``."""
        if self._mean is None or self._count == 0:
            raise ValueError("No features have been accumulated yet.")
        return self._mean.cpu().numpy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased feature covariance, float64 array of shape ``(D, D)``."""
        if self._count is None:
            return self._second_moment.cpu().numpy()
        if self._count < 2:
            raise ValueError(f"The covariance needs at least 2 samples, got {self._count}.")
        return (self._second_moment / (self._count - 1)).cpu().numpy()

    def frechet_distance(self, other: "FeatureStatistics") -> float:
        """Frechet distance between the Gaussians fitted to ``self`` and ``other``."""
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)

    def save(self, path: PathLike) -> None:
        """Writes ``mu`` ``(D,)``, ``sigma`` ``(D, D)`` and, when known, ``count`` to an ``.npz`` file at exactly
        ``path``."""
        arrays = {"mu": self.mean, "sigma": self.covariance}
        if self._count is not None:
            arrays["count"] = np.asarray(self._count, dtype=np.int64)
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "FeatureStatistics":
        """
        Reads statistics from an ``.npz`` file with arrays ``mu`` ``(D,)`` and ``sigma`` ``(D, D)``, and optionally
        ``count``.

        Files written by ``FeatureStatistics.save`` and the ADM evaluator's reference batches (which also hold
        ``arr_0`` images and ``mu_s``/``sigma_s`` spatial statistics, ignored here) are both accepted.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Statistics file {os.fspath(path)!r} does not exist.")
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{os.fspath(path)!r} is not a readable .npz file ({error}).") from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{os.fspath(path)!r} holds a single array; expected an .npz with `mu` and `sigma`.")
        with archive:
            names = set(archive.files)
            missing = {"mu", "sigma"} - names
            if missing:
                raise ValueError(
                    f"{os.fspath(path)!r} lacks the array(s) {sorted(missing)} (found {sorted(names)}); expected an "
                    ".npz with `mu` (D,) and `sigma` (D, D), as written by FeatureStatistics.save."
                )
            try:
                mean = np.asarray(archive["mu"], dtype=np.float64)
                covariance = np.asarray(archive["sigma"], dtype=np.float64)
                count = archive["count"] if "count" in names else None
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
                raise ValueError(f"{os.fspath(path)!r} has corrupt arrays ({error}).") from error
        if mean.ndim != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(
                f"{os.fspath(path)!r}: `mu` must have shape (D,) and `sigma` shape (D, D), got {mean.shape} and "
                f"{covariance.shape}."
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(covariance))):
            raise ValueError(f"{os.fspath(path)!r} contains NaN or infinite statistics.")
        if count is not None:
            if count.shape != () or not np.issubdtype(count.dtype, np.integer) or int(count) < 2:
                raise ValueError(f"{os.fspath(path)!r}: `count` must be an integer scalar >= 2, got {count!r}.")
            count = int(count)
        mean = torch.from_numpy(mean)
        covariance = torch.from_numpy(covariance)
        second_moment = covariance if count is None else covariance * (count - 1)
        return cls._from_moments(count, mean, second_moment, device)


class FeatureReservoir:
    """
    A uniform random subset of at most ``capacity`` feature rows from a stream (reservoir sampling, Algorithm R), for
    metrics such as precision/recall that need the features themselves.

    Args:
        capacity (int): maximum number of rows kept.
        seed (int): seed of the sampling generator, for reproducible subsets.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`capacity` must be a positive integer, got {capacity!r}.")
        self.capacity = capacity
        self.num_seen = 0
        self._rows: Optional[torch.Tensor] = None
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, features: Union[torch.Tensor, np.ndarray]) -> None:
        """Offers a batch of features ``(N, D)``; they are stored as float32 on the CPU."""
        features = _validate_features(features, None if self._rows is None else self._rows.shape[1])
        features = features.detach().to(device="cpu", dtype=torch.float32)
        if self._rows is None:
            self._rows = torch.empty(0, features.shape[1])
        free = min(self.capacity - self._rows.shape[0], features.shape[0])
        if free:
            self._rows = torch.cat([self._rows, features[:free]])
        # Row number i (0-based in the stream) replaces a random slot with probability capacity / (i + 1).
        stream_positions = torch.arange(self.num_seen + free, self.num_seen + features.shape[0])
        slots = (torch.rand(stream_positions.shape[0], generator=self._generator) * (stream_positions + 1)).long()
        # Replacements happen in stream order, so a later row hitting the same slot wins.
        for offset in (slots < self.capacity).nonzero().flatten().tolist():
            self._rows[slots[offset]] = features[free + offset]
        self.num_seen += features.shape[0]

    @property
    def features(self) -> torch.Tensor:
        """The kept rows, float32 tensor of shape ``(min(num_seen, capacity), D)``."""
        if self._rows is None:
            raise ValueError("The reservoir has not received any features yet.")
        return self._rows


def gather_statistics(statistics: FeatureStatistics, accelerator) -> FeatureStatistics:
    """
    Merges the per-process statistics of a distributed run (``accelerate launch``) into statistics of all samples.

    Every process must call this (it is a collective operation) and returns the same merged result.

    Args:
        statistics (FeatureStatistics): this process's statistics; give them ``dim`` up front if a process may
            receive no samples.
        accelerator (accelerate.Accelerator): the run's accelerator; its ``gather`` collects counts, means and
            centred second moments, which are then combined exactly.
    """
    statistics._require_count("gather statistics")
    if statistics.dim is None:
        raise ValueError(
            "These statistics have no feature dimension yet (no samples on this process); create them with "
            "FeatureStatistics(dim=...) so every process can take part in the gather."
        )
    device = accelerator.device
    counts = accelerator.gather(torch.tensor([statistics.count], dtype=torch.int64, device=device))
    means = accelerator.gather(statistics._mean[None].to(device))
    second_moments = accelerator.gather(statistics._second_moment[None].to(device))
    merged = FeatureStatistics(dim=statistics.dim, device=statistics.device)
    for count, mean, second_moment in zip(counts.tolist(), means, second_moments):
        merged._combine(count, mean.to(merged.device), second_moment.to(merged.device))
    return merged
