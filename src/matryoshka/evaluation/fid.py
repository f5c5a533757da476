"""Distribution metrics on feature vectors: FID, KID, and k-NN precision/recall.

Everything here works on plain ``(N, D)`` feature matrices (numpy arrays or torch tensors), whatever
network produced them; statistics are computed in float64.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from matryoshka.atomic import atomic_path, atomic_write_text

__all__ = [
    "FeatureStats",
    "PrecisionRecall",
    "StaleStatsError",
    "cached_feature_stats",
    "fid_from_stats",
    "frechet_distance",
    "kid",
    "precision_recall",
    "stats_key",
]

ArrayLike = np.ndarray | torch.Tensor


def _as_feature_matrix(features: ArrayLike, name: str, dtype: type = np.float64) -> np.ndarray:
    """(N, D) numpy view (``dtype``) of a feature matrix; clear errors for bad shapes and values."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    array = np.asarray(features)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature matrix, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


class StaleStatsError(ValueError):
    """Cached statistics were produced by something other than what is asked for."""


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields instead
class FeatureStats:
    """Gaussian summary of a feature set: ``mean`` (D,), ``cov`` (D, D) (unbiased), ``n`` samples.

    ``key`` names what produced them (see ``stats_key``); it is stored with the arrays so a cache
    file can be checked before use.
    """

    mean: np.ndarray
    cov: np.ndarray
    n: int
    key: str = ""

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.cov.shape != (self.mean.shape[0],) * 2:
            raise ValueError(f"FeatureStats needs mean (D,) and cov (D, D), got {self.mean.shape} and {self.cov.shape}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, features: ArrayLike, key: str = "", chunk_size: int = 4096) -> FeatureStats:
        """Mean and unbiased covariance of ``(N, D)`` features, N >= 2.

        Accumulated in float64 over row chunks so that a large float32 matrix is never copied whole.
        """
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features must be a 2-D (N, D) matrix, got shape {features.shape}")
        n, dim = features.shape
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
        total = np.zeros(dim)
        for start in range(0, n, chunk_size):
            chunk = _as_feature_matrix(features[start : start + chunk_size], "features")
            total += chunk.sum(axis=0)
        mean = total / n
        scatter = np.zeros((dim, dim))
        for start in range(0, n, chunk_size):
            centred = features[start : start + chunk_size].astype(np.float64) - mean
            scatter += centred.T @ centred
        return cls(mean=mean, cov=scatter / (n - 1), n=n, key=key)

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (.npz; the suffix is added if missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:  # never a truncated cache file
            np.savez(handle, mean=self.mean, cov=self.cov, n=np.int64(self.n), key=np.str_(self.key))
        return path

    @classmethod
    def load(cls, path: str | Path, expected_key: str | None = None) -> FeatureStats:
        """Read a file written by ``save``; with ``expected_key``, raise StaleStatsError on mismatch."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no feature statistics file at {path}")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mean", "cov", "n", "key"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStats file (missing {sorted(missing)})")
            stats = cls(mean=data["mean"], cov=data["cov"], n=int(data["n"]), key=str(data["key"]))
        if expected_key is not None and stats.key != expected_key:
            raise StaleStatsError(f"{path} holds statistics for key {stats.key!r}, expected {expected_key!r}")
        return stats


def stats_key(description: Mapping[str, Any]) -> str:
    """Short stable hash of what produced some statistics.

    ``description`` is any JSON-serialisable mapping, e.g. ``{"dataset": "fashion-mnist/train",
    "size": 32, "n": 60000, "extractor": extractor.fingerprint}``; key order does not matter.
    """
    try:
        canonical = json.dumps(description, sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"stats description must be JSON-serialisable: {error}") from error
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cached_feature_stats(
    cache_dir: str | Path, description: Mapping[str, Any], compute: Callable[[], FeatureStats]
) -> FeatureStats:
    """Load ``cache_dir/<stats_key(description)>.npz``, or ``compute()`` it, save it and return it."""
    key = stats_key(description)
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        return FeatureStats.load(path, expected_key=key)
    stats = compute()
    stats = FeatureStats(mean=stats.mean, cov=stats.cov, n=stats.n, key=key)
    stats.save(path)
    # the description beside the numbers, so a person can tell cache files apart
    atomic_write_text(path.with_suffix(".json"), json.dumps(dict(description), indent=2, sort_keys=True) + "\n")
    return stats


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2.0


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD inputs, without ever leaving the reals.

    sigma1 @ sigma2 is similar to S @ sigma2 @ S with S = sigma1^(1/2), which is symmetric PSD, so
    the trace of the square root is the sum of the square roots of its eigenvalues. Round-off makes
    tiny negative eigenvalues, which are clipped to zero; this is what keeps near-singular covariances
    (fewer samples than dimensions) stable without an eps offset.
    """
    values, vectors = np.linalg.eigh(_symmetric(sigma1))
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = _symmetric(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """tr sqrt(sigma1 @ sigma2) via scipy's general matrix square root (the classic FID recipe)."""
    from scipy import linalg

    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        # singular product: nudge both covariances away from singularity
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        largest = np.abs(np.diagonal(root).imag).max()
        if largest > 1e-3:
            raise ValueError(f"matrix square root has a large imaginary component ({largest:.3g})")
        root = root.real
    return float(np.trace(root))


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    eps: float = 1e-6,
    method: str = "eigh",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)``

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D), symmetric positive semi-definite.
        eps: diagonal offset used by ``method="sqrtm"`` when the product is singular.
        method: ``"eigh"`` (default; symmetric eigendecompositions, real throughout, stable for
            singular covariances) or ``"sqrtm"`` (scipy.linalg.sqrtm of the product, the classic
            recipe: eps offset if singular, small imaginary parts dropped).
    Returns:
        the distance as a float (tiny negative round-off is clipped to 0).
    """
    mean1, mean2 = (np.atleast_1d(np.asarray(_to_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    cov1, cov2 = (np.atleast_2d(np.asarray(_to_numpy(s), dtype=np.float64)) for s in (sigma1, sigma2))
    if mean1.shape != mean2.shape or mean1.ndim != 1:
        raise ValueError(f"means must be vectors of one length, got {mean1.shape} and {mean2.shape}")
    dim = mean1.shape[0]
    if cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(f"covariances must be ({dim}, {dim}), got {cov1.shape} and {cov2.shape}")
    for name, array in (("mu1", mean1), ("mu2", mean2), ("sigma1", cov1), ("sigma2", cov2)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if method == "eigh":
        trace_root = _trace_sqrt_product_eigh(cov1, cov2)
    elif method == "sqrtm":
        trace_root = _trace_sqrt_product_sqrtm(cov1, cov2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eigh' or 'sqrtm'")
    diff = mean1 - mean2
    distance = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root
    return max(float(distance), 0.0)


def _to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats, **kwargs: Any) -> float:
    """``frechet_distance`` of two FeatureStats (keyword arguments are passed on)."""
    if stats1.dim != stats2.dim:
        raise ValueError(f"feature dimensions differ: {stats1.dim} vs {stats2.dim}")
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov, **kwargs)


def kid(
    features_a: ArrayLike,
    features_b: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the kernel ``k(x, y) = (x.y / D + 1)^3``.

    Averaged over ``subsets`` random subsets of ``subset_size`` rows drawn (without replacement
    within a subset) from each of ``features_a`` (N_a, D) and ``features_b`` (N_b, D).
    Returns ``(mean, std)`` over the subsets; the unbiased estimate can be slightly negative.
    """
    a = _as_feature_matrix(features_a, "features_a")
    b = _as_feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    if subset_size > min(len(a), len(b)):
        raise ValueError(f"subset_size {subset_size} exceeds the smaller feature set ({len(a)} and {len(b)} rows)")
    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    m = subset_size
    estimates = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        # unbiased: the diagonals k(x_i, x_i) are left out of the within-set means
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2.0 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """(N,) distance from each point to its k-th nearest other point."""
    radii = []
    for chunk in points.split(chunk_size):
        distances = torch.cdist(chunk, points)
        # the point itself is at distance 0 and is the first of the k + 1 smallest
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> float:
    """Fraction of queries within radius of at least one centre (i.e. on the estimated manifold)."""
    inside = 0
    for chunk in queries.split(chunk_size):
        distances = torch.cdist(chunk, centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real_features: ArrayLike, fake_features: ArrayLike, k: int = 3, chunk_size: int = 1024
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN manifold estimates.

    Each set's manifold is the union of balls around its points, each with the radius to that
    point's k-th nearest neighbour in the same set. Precision: fraction of fake points inside the real
    manifold; recall: fraction of real points inside the fake manifold. Distances are computed in
    float32 (ample for this test, and half the memory and time), ``chunk_size`` rows at a time, so
    memory stays at ``chunk_size * N`` distances.

    Args:
        real_features: (N_r, D); fake_features: (N_f, D); both sets need more than ``k`` points.
    """
    real = torch.from_numpy(_as_feature_matrix(real_features, "real_features", np.float32))
    fake = torch.from_numpy(_as_feature_matrix(fake_features, "fake_features", np.float32))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"both feature sets need more than k={k} points, got {len(real)} and {len(fake)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    real_radii = _kth_neighbour_radii(real, k, chunk_size)
    fake_radii = _kth_neighbour_radii(fake, k, chunk_size)
    return PrecisionRecall(
        precision=_fraction_inside(fake, real, real_radii, chunk_size),
        recall=_fraction_inside(real, fake, fake_radii, chunk_size),
    )
