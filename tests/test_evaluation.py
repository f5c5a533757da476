"""Distribution metrics (FID, KID, precision/recall), feature statistics cache, and reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.evaluation import (
    FeatureStats,
    StaleStatsError,
    cached_feature_stats,
    fid_from_stats,
    frechet_distance,
    kid,
    plot_bars,
    plot_curves,
    precision_recall,
    stats_key,
    write_json_report,
)

METHODS = ["eigh", "sqrtm"]


def random_spd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / dim + (0.0 if rank else 0.1) * np.eye(dim)


def random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q


def closed_form_commuting(mu1, mu2, eig1, eig2) -> float:
    """FID of N(mu1, Q diag(eig1) Q^T) and N(mu2, Q diag(eig2) Q^T): covariances share eigenvectors."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2))


# ---------------------------------------------------------------------------------------------- FID


@pytest.mark.parametrize("method", METHODS)
def test_fid_diagonal_covariances_match_closed_form(method: str) -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    value = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), method=method)
    assert value == pytest.approx(closed_form_commuting(mu1, mu2, var1, var2), rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_commuting_rotated_covariances_match_closed_form(method: str) -> None:
    rng = np.random.default_rng(1)
    q = random_rotation(rng, 8)
    eig1, eig2 = rng.uniform(0.05, 4.0, size=8), rng.uniform(0.05, 4.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    value = frechet_distance(mu1, q @ np.diag(eig1) @ q.T, mu2, q @ np.diag(eig2) @ q.T, method=method)
    assert value == pytest.approx(closed_form_commuting(mu1, mu2, eig1, eig2), rel=1e-7)


def test_fid_one_dimensional_is_squared_mean_and_std_difference() -> None:
    value = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert value == pytest.approx(3.0**2 + (2.0 - 3.0) ** 2)


@pytest.mark.parametrize("method", METHODS)
def test_fid_random_spd_pair_matches_independent_eigenvalue_computation(method: str) -> None:
    # non-commuting covariances: tr sqrt(s1 s2) = sum of square roots of the (real, positive)
    # eigenvalues of the non-symmetric product s1 @ s2, computed here with a general eigensolver
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 12), random_spd(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    product_eigenvalues = np.linalg.eigvals(s1 @ s2)
    assert np.abs(product_eigenvalues.imag).max() < 1e-9
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(product_eigenvalues.real).sum()
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_identical_stats_is_zero(method: str) -> None:
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=16), random_spd(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_identical_singular_stats_is_zero_and_finite(method: str) -> None:
    # fewer samples than dimensions: rank-deficient covariance, the case the eps offset exists for
    features = np.random.default_rng(4).normal(size=(5, 32))
    stats = FeatureStats.from_features(features)
    assert np.linalg.matrix_rank(stats.cov) == 4
    value = fid_from_stats(stats, stats, method=method)
    assert math.isfinite(value)
    assert value == pytest.approx(0.0, abs=1e-3)


def test_fid_methods_agree_on_near_singular_different_covariances() -> None:
    rng = np.random.default_rng(5)
    s1, s2 = random_spd(rng, 20, rank=6), random_spd(rng, 20, rank=9)
    mu = np.zeros(20)
    by_eigh = frechet_distance(mu, s1, mu, s2, method="eigh")
    by_sqrtm = frechet_distance(mu, s1, mu, s2, method="sqrtm")
    assert by_eigh > 0.1
    assert by_sqrtm == pytest.approx(by_eigh, rel=1e-4)


def test_fid_from_gaussian_samples_converges_to_analytic_value() -> None:
    rng = np.random.default_rng(6)
    dim = 4
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    analytic = frechet_distance(mu1, s1, mu2, s2)
    errors = []
    for n in (200, 50_000):
        a = FeatureStats.from_features(rng.multivariate_normal(mu1, s1, size=n))
        b = FeatureStats.from_features(rng.multivariate_normal(mu2, s2, size=n))
        errors.append(abs(fid_from_stats(a, b) - analytic))
    assert errors[1] < 0.02 * analytic
    assert errors[1] < errors[0]


def test_fid_accepts_torch_tensors() -> None:
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, sigma, mu + 1, 4 * sigma) == pytest.approx(3 * 1.0 + 3 * 1.0)


def test_fid_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="magic")


# ---------------------------------------------------------------------------- statistics and cache


def test_feature_stats_match_numpy_mean_and_cov_across_chunks() -> None:
    features = np.random.default_rng(7).normal(size=(101, 5)).astype(np.float32)
    stats = FeatureStats.from_features(torch.from_numpy(features), chunk_size=16)
    assert stats.n == 101
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features.astype(np.float64), rowvar=False), atol=1e-12)


def test_feature_stats_need_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 4)))


def test_feature_stats_save_load_round_trip(tmp_path) -> None:
    stats = FeatureStats.from_features(np.random.default_rng(8).normal(size=(30, 6)), key="abc")
    path = stats.save(tmp_path / "stats")
    assert path.name == "stats.npz"
    loaded = FeatureStats.load(path, expected_key="abc")
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert (loaded.n, loaded.key) == (30, "abc")
    with pytest.raises(StaleStatsError, match="abc"):
        FeatureStats.load(path, expected_key="other")
    with pytest.raises(FileNotFoundError):
        FeatureStats.load(tmp_path / "missing.npz")


def test_stats_key_is_stable_and_sensitive() -> None:
    base = {"dataset": "fashion-mnist/train", "size": 32, "extractor": "inception-x"}
    assert stats_key(base) == stats_key(dict(reversed(list(base.items()))))
    assert stats_key(base) != stats_key({**base, "size": 16})
    with pytest.raises(TypeError, match="JSON"):
        stats_key({"bad": object()})


def test_cached_feature_stats_computes_once_per_description(tmp_path) -> None:
    calls = []
    rng = np.random.default_rng(9)

    def compute() -> FeatureStats:
        calls.append(1)
        return FeatureStats.from_features(rng.normal(size=(20, 3)))

    description = {"dataset": "toy", "n": 20}
    first = cached_feature_stats(tmp_path, description, compute)
    second = cached_feature_stats(tmp_path, description, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.cov, second.cov)
    assert second.key == stats_key(description)
    assert (tmp_path / f"{stats_key(description)}.npz").is_file()
    assert json.loads((tmp_path / f"{stats_key(description)}.json").read_text()) == description
    cached_feature_stats(tmp_path, {"dataset": "toy", "n": 21}, compute)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- KID


def test_kid_matches_direct_unbiased_mmd_on_full_sets() -> None:
    # one subset of the whole set is a permutation of it, and the estimate is permutation invariant
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(7, 3)), rng.normal(loc=0.5, size=(7, 3))
    kernel = lambda a, b: (a @ b / 3 + 1) ** 3
    m = 7
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kid(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    shifted = rng.normal(loc=0.5, size=(600, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=300)
    shift_mean, _ = kid(a, shifted, subsets=20, subset_size=300)
    assert abs(same_mean) < 0.02 * shift_mean
    assert shift_mean > 5 * same_std
    assert same_std > 0


def test_kid_rejects_oversized_subsets() -> None:
    with pytest.raises(ValueError, match="subset_size"):
        kid(np.zeros((10, 2)), np.zeros((50, 2)), subset_size=20)
    with pytest.raises(ValueError, match="dimensions"):
        kid(np.zeros((10, 2)), np.zeros((10, 3)), subset_size=5)


# ---------------------------------------------------------------------------- precision and recall


def test_precision_recall_identical_sets_are_one() -> None:
    features = np.random.default_rng(12).normal(size=(200, 10))
    assert precision_recall(features, features.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets_are_zero() -> None:
    rng = np.random.default_rng(13)
    real, fake = rng.normal(size=(200, 10)), rng.normal(loc=20.0, size=(200, 10))
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_tell_mode_dropping_from_poor_quality() -> None:
    # real data has two clusters; fake covers only one of them (mode dropping):
    # every fake point looks real (precision ~1) but half the real data is missed (recall ~0.5)
    rng = np.random.default_rng(14)
    real = np.concatenate([rng.normal(size=(150, 8)), rng.normal(loc=15.0, size=(150, 8))])
    fake = rng.normal(size=(150, 8))
    precision, recall = precision_recall(real, fake, k=5)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5


def test_precision_recall_independent_of_chunk_size() -> None:
    rng = np.random.default_rng(15)
    real, fake = rng.normal(size=(90, 6)), rng.normal(loc=0.7, size=(70, 6))
    assert precision_recall(real, fake, chunk_size=7) == precision_recall(real, fake, chunk_size=1000)


def test_precision_recall_needs_more_points_than_k() -> None:
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ------------------------------------------------------------------------------------------ reports


def test_json_report_converts_numpy_torch_and_paths(tmp_path) -> None:
    rng = np.random.default_rng(16)
    report = {
        "fid": np.float64(12.5),
        "kid": (0.01, 0.002),
        "features": torch.tensor([1.0, 2.0]),
        "per_class": {0: 0.9, 1: np.float32(0.5)},
        "precision_recall": precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 2))),
        "weights": tmp_path / "model",
        "undefined": float("nan"),
    }
    path = write_json_report(report, tmp_path / "out" / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded["fid"] == 12.5
    assert loaded["kid"] == [0.01, 0.002]
    assert loaded["features"] == [1.0, 2.0]
    assert loaded["per_class"] == {"0": 0.9, "1": 0.5}
    assert set(loaded["precision_recall"]) == {"precision", "recall"}
    assert loaded["weights"] == str(tmp_path / "model")
    assert loaded["undefined"] is None
    with pytest.raises(TypeError, match="object"):
        write_json_report({"x": object()}, tmp_path / "bad.json")


def test_plot_curves_writes_png(tmp_path) -> None:
    curves = {"mdm": [(1000, 80.0), (0, 300.0), (2000, 40.0)], "plain unet": [(0, 310.0), (2000, 90.0)]}
    path = plot_curves(curves, tmp_path / "plots" / "fid.png", ylabel="FID", log_y=True)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200
    with pytest.raises(ValueError, match="no points"):
        plot_curves({"empty": []}, tmp_path / "x.png", ylabel="FID")
    with pytest.raises(ValueError, match="png"):
        plot_curves(curves, tmp_path / "fid.pdf", ylabel="FID")


def test_plot_bars_writes_png(tmp_path) -> None:
    path = plot_bars({0: 0.9, 1: 0.4, 2: 0.7}, tmp_path / "acc.png", ylabel="accuracy", names=["a", "b", "c"])
    with Image.open(path) as image:
        assert image.format == "PNG"
