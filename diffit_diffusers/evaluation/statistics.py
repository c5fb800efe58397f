"""Reference feature statistics, held in the state of torchmetrics' FID and stored in ``.npz`` files, and a bounded
reservoir of features."""

import importlib
import os
import zipfile
from types import ModuleType
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch


PathLike = Union[str, os.PathLike]


def import_torchmetrics_image(module: str) -> ModuleType:
    """``torchmetrics.image.<module>``, or an ``ImportError`` naming the extra that installs torchmetrics."""
    try:
        return importlib.import_module(f"torchmetrics.image.{module}")
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("torchmetrics"):
            raise
        raise ImportError(
            "Evaluation computes FID, KID and the Inception Score with torchmetrics: `pip install torchmetrics` "
            "(or the package's `eval` extra)."
        ) from error


class FeatureInput(torch.nn.Module):
    """The ``feature`` network of torchmetrics' image metrics when they receive features extracted beforehand.

    Args:
        num_features (int): feature dimension ``D`` (read by torchmetrics instead of probing the network).
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Returns the features ``(N, D)`` as float64, so the metrics compute in float64."""
        return features.double()


def frechet_distance_metric(num_features: int, device: Union[str, torch.device] = "cpu"):
    """A ``torchmetrics`` ``FrechetInceptionDistance`` that takes features ``(N, num_features)`` and keeps its real
    half across ``reset()``."""
    fid = import_torchmetrics_image("fid")
    return fid.FrechetInceptionDistance(feature=FeatureInput(num_features), reset_real_features=False).to(device)


def validate_features(features: Union[torch.Tensor, np.ndarray], expected_dim: Optional[int]) -> torch.Tensor:
    """Returns ``features`` as a tensor after checking it is a finite ``(N, D)`` matrix with ``D == expected_dim``."""
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


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and unbiased covariance of the features of an image collection, as FID compares them.

    Args:
        mean (np.ndarray): float64 feature mean ``(D,)``.
        covariance (np.ndarray): float64 covariance ``(D, D)``, normalised by ``count - 1`` as ``np.cov`` does.
        count (int, optional): number of images; ``None`` for statistics read without one (the ADM evaluator's
            reference batches).
    """

    mean: np.ndarray
    covariance: np.ndarray
    count: Optional[int]

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.mean.shape[0]

    @classmethod
    def from_metric(cls, metric, half: str = "real") -> "FeatureStatistics":
        """The statistics of the ``"real"`` or ``"fake"`` half of a ``FrechetInceptionDistance`` metric's state."""
        count = int(getattr(metric, f"{half}_features_num_samples"))
        if count < 2:
            raise ValueError(f"Feature statistics need at least 2 samples, got {count}.")
        mean = getattr(metric, f"{half}_features_sum").double().cpu() / count
        centred_sum = getattr(metric, f"{half}_features_cov_sum").double().cpu() - count * torch.outer(mean, mean)
        return cls(mean=mean.numpy(), covariance=(centred_sum / (count - 1)).numpy(), count=count)

    @classmethod
    def from_features(cls, features: Union[torch.Tensor, np.ndarray]) -> "FeatureStatistics":
        """Statistics of one finite feature matrix ``(N, D)``, accumulated by torchmetrics' FID."""
        features = validate_features(features, None)
        metric = frechet_distance_metric(features.shape[1])
        metric.update(features, real=True)
        return cls.from_metric(metric)

    def load_into(self, metric, half: str = "real") -> None:
        """Writes these statistics into the ``"real"`` or ``"fake"`` half of a ``FrechetInceptionDistance`` state.

        The state holds sums, so a missing ``count`` is stood in by 2, which reproduces ``mean`` and ``covariance``.
        """
        device = getattr(metric, f"{half}_features_sum").device
        count = 2 if self.count is None else self.count
        mean = torch.from_numpy(self.mean).to(device)
        covariance = torch.from_numpy(self.covariance).to(device)
        setattr(metric, f"{half}_features_sum", mean * count)
        setattr(metric, f"{half}_features_cov_sum", covariance * (count - 1) + count * torch.outer(mean, mean))
        setattr(metric, f"{half}_features_num_samples", torch.tensor(count, device=device))

    def frechet_distance(self, other: "FeatureStatistics") -> float:
        """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` to ``other``, by torchmetrics."""
        if other.dim != self.dim:
            raise ValueError(
                f"The two statistics have different feature dimensions ({self.dim} vs {other.dim}); they must come "
                "from the same feature extractor."
            )
        # The formula FrechetInceptionDistance.compute applies to its accumulated statistics.
        tensors = [torch.from_numpy(array) for array in (self.mean, self.covariance, other.mean, other.covariance)]
        return float(import_torchmetrics_image("fid")._compute_fid(*tensors))

    def save(self, path: PathLike) -> None:
        """Writes ``mu`` ``(D,)``, ``sigma`` ``(D, D)`` and, when known, ``count`` to an ``.npz`` at exactly ``path``."""
        arrays = {"mu": self.mean, "sigma": self.covariance}
        if self.count is not None:
            arrays["count"] = np.asarray(self.count, dtype=np.int64)
        with open(path, "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: PathLike) -> "FeatureStatistics":
        """Reads statistics from an ``.npz`` with ``mu`` ``(D,)``, ``sigma`` ``(D, D)`` and optionally ``count``.

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
        return cls(mean=mean, covariance=covariance, count=count)


class FeatureReservoir:
    """A uniform random subset of at most ``capacity`` feature rows from a stream (reservoir sampling, Algorithm R),
    for the metrics that need the features themselves (KID, precision/recall).

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
        features = validate_features(features, None if self._rows is None else self._rows.shape[1])
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
