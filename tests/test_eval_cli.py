"""`matryoshka eval` and its orchestration (matryoshka.evaluation.run) on a tiny random model.

The end-to-end run samples 4 images and scores them against 4 reference images with the real FID
Inception network (8 forward passes at 299 px: a few seconds on 2 idle cores).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka import cli
from matryoshka.conditioning.testing import make_tiny_t5
from matryoshka.data import caption_names_class
from matryoshka.diffusion import DiffusionConfig
from matryoshka.evaluation import ClassifierConfig, FeatureStats, SmallCNNClassifier, save_classifier
from matryoshka.evaluation.run import (
    EvalSettings,
    ReferenceSet,
    Samples,
    balanced_labels,
    distribution_metrics,
    fid_from_features,
    generate_samples,
    load_reference_images,
    reference_set,
    sample_grid,
)
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline

CLASS_NAMES = ["boot", "shirt", "bag"]
NUM_SAMPLES = 4
NUM_REFERENCE = 4


def tiny_config(num_classes: int = 0, text_dim: int = 0) -> ModelConfig:
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    config = ModelConfig(levels=[outer, core], image_size=32, in_channels=1, num_classes=num_classes, text_dim=text_dim)
    config.validate()
    return config


def random_model(config: ModelConfig) -> NestedUNet:
    """Zero-initialised output layers made non-zero, so the samples depend on the conditioning."""
    torch.manual_seed(0)
    model = NestedUNet(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def class_model_dir(tmp_path_factory) -> Path:
    config = MDMConfig(model=tiny_config(num_classes=3), diffusion=DiffusionConfig(), class_names=CLASS_NAMES)
    return save_model_dir(tmp_path_factory.mktemp("model"), random_model(config.model), config)


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i in range(NUM_REFERENCE):
        pixels = np.zeros((32, 32), dtype=np.uint8)
        pixels[4 + i : 26, 6:26] = rng.integers(60, 255, size=(22 - i, 20), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"real_{i}.png")
    return folder


def save_tiny_classifier(directory: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    model = SmallCNNClassifier(ClassifierConfig(in_channels=1, image_size=32, num_classes=num_classes, width=4))
    return save_classifier(model.eval(), directory)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, class_model_dir, reference_folder) -> tuple[int, Path, Path]:
    """One end-to-end `matryoshka eval` run: (exit code, --out, --cache-dir)."""
    root = tmp_path_factory.mktemp("eval")
    classifier = save_tiny_classifier(root / "classifier", num_classes=3)
    out, cache = root / "out", root / "cache"
    code = cli.main([
        "eval", "--model", str(class_model_dir), "--reference", str(reference_folder),
        "--num-samples", str(NUM_SAMPLES), "--steps", "2", "--batch-size", "3", "--classifier", str(classifier),
        "--kid-subsets", "3", "--cache-dir", str(cache), "--out", str(out), "--quiet",
    ])
    return code, out, cache


# ---------------------------------------------------------------------------------------------------
# The feature -> statistics -> FID path, against the closed form


def gaussian_features_with_moments(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, D) rows whose sample mean is exactly `mean` and whose unbiased sample covariance is exactly `cov`."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    # whiten the sample (its covariance becomes I), then colour it with cov^(1/2)
    values, vectors = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ vectors @ np.diag(values**-0.5) @ vectors.T
    values, vectors = np.linalg.eigh(cov)
    return z @ (vectors * np.sqrt(values)) @ vectors.T + mean


def test_fid_from_features_equals_closed_form_for_gaussian_features() -> None:
    """Two Gaussians with covariances Q diag(l1) Q^T and Q diag(l2) Q^T (one random eigenbasis Q):
    FID = |mu1 - mu2|^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2."""
    rng = np.random.default_rng(1)
    dim = 12
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    l1, l2 = rng.uniform(0.2, 3.0, dim), rng.uniform(0.2, 3.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    a = gaussian_features_with_moments(mu1, q @ np.diag(l1) @ q.T, 300, seed=2)
    b = gaussian_features_with_moments(mu2, q @ np.diag(l2) @ q.T, 200, seed=3)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2))

    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(torch.from_numpy(a).float(), b) == pytest.approx(expected, rel=1e-5)
    # what the command calls: distribution_metrics with a reference set's cached statistics
    reference = ReferenceSet(features=b, stats=FeatureStats.from_features(b, key="k"), description={})
    metrics = distribution_metrics(a, reference, kid_subsets=2, kid_subset_size=50)
    assert metrics["fid"] == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_distribution_metrics_see_a_shifted_distribution() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8))
    reference = ReferenceSet(features=real, stats=FeatureStats.from_features(real), description={})
    same = distribution_metrics(rng.standard_normal((200, 8)), reference, kid_subsets=5, kid_subset_size=100)
    shifted = distribution_metrics(rng.standard_normal((200, 8)) + 3.0, reference, kid_subsets=5, kid_subset_size=100)
    assert same["fid"] < 1.0 < 50.0 < shifted["fid"]
    assert abs(same["kid"]["mean"]) < shifted["kid"]["mean"]
    assert same["precision"] > 0.5 and shifted["precision"] < 0.1
    assert shifted["kid"]["subset_size"] == 100


# ---------------------------------------------------------------------------------------------------
# The command, end to end


def test_eval_command_writes_a_report_with_finite_numbers(eval_run) -> None:
    code, out, _ = eval_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_samples"] == NUM_SAMPLES
    for value in (report["fid"], report["kid"]["mean"], report["kid"]["std"], report["precision"], report["recall"]):
        assert isinstance(value, float) and math.isfinite(value)
    assert report["fid"] > 0  # random-weight samples are not the reference images
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    conditioning = report["conditioning"]
    assert conditioning["kind"] == "class"
    assert set(conditioning["per_class"]) == set(CLASS_NAMES)
    assert 0 <= conditioning["accuracy"] <= 1
    assert report["reference"]["reference"] == "folder" and report["reference"]["n"] == NUM_REFERENCE
    assert report["settings"]["steps"] == 2
    for name in ("samples.png", "per_class_accuracy.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 32
    # the grid has one row per class: 3 rows of 32 px plus padding
    with Image.open(out / "samples.png") as grid:
        assert grid.size[1] == 3 * 34 + 2


def test_eval_fid_matches_an_independent_computation_on_the_same_features(eval_run) -> None:
    """The report's FID, recomputed from the features the command saved (its samples') and cached
    (the reference's) by another route than the library's: with centred rows X1 (n1, D), X2 (n2, D),
    S1 S2 has the nonzero eigenvalues of (X1 X2^T)(X2 X1^T) / ((n1-1)(n2-1)), so
    tr sqrt(S1 S2) = ||X1 X2^T||_* / sqrt((n1-1)(n2-1)) (nuclear norm of an n1 x n2 matrix)."""
    _, out, cache = eval_run
    report = json.loads((out / "report.json").read_text())
    samples = np.load(out / "sample_features.npy").astype(np.float64)
    reference = np.load(cache / f"{report['reference']['key']}.features.npy").astype(np.float64)
    assert samples.shape == (NUM_SAMPLES, 2048) and reference.shape == (NUM_REFERENCE, 2048)

    x1, x2 = samples - samples.mean(axis=0), reference - reference.mean(axis=0)
    n1, n2 = len(x1), len(x2)
    trace_s1, trace_s2 = np.sum(x1**2) / (n1 - 1), np.sum(x2**2) / (n2 - 1)
    trace_root = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    mean_gap = np.sum((samples.mean(axis=0) - reference.mean(axis=0)) ** 2)
    expected = float(mean_gap + trace_s1 + trace_s2 - 2 * trace_root)
    assert report["fid"] == pytest.approx(expected, rel=1e-6)


def test_reference_features_are_cached_under_the_extractor_fingerprint(eval_run, reference_folder) -> None:
    _, out, cache = eval_run
    report = json.loads((out / "report.json").read_text())

    class CountingExtractor:
        def __init__(self, fingerprint: str) -> None:
            self.fingerprint, self.calls = fingerprint, 0

        def extract(self, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
            self.calls += 1
            return torch.randn(images.shape[0], 2048)

    same = CountingExtractor(report["reference"]["extractor"])
    cached = reference_set(same, str(reference_folder), 32, 1, 2000, cache, progress=False)
    assert same.calls == 0 and cached.key == report["reference"]["key"]
    other = CountingExtractor("another-network")
    fresh = reference_set(other, str(reference_folder), 32, 1, 2000, cache, progress=False)
    assert other.calls == 1 and fresh.key != cached.key and fresh.stats.n == NUM_REFERENCE


def test_reference_key_changes_when_the_folder_changes(tmp_path, reference_folder) -> None:
    folder = tmp_path / "ref"
    folder.mkdir()
    for path in sorted(reference_folder.iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    _, before = load_reference_images(str(folder), 32, 1, 100)
    Image.new("L", (32, 32), 200).save(folder / "extra.png")
    load, after = load_reference_images(str(folder), 32, 1, 100)
    assert before != after and after["n"] == 4
    assert load().shape == (4, 1, 32, 32)
    _, limited = load_reference_images(str(folder), 16, 1, 2)
    assert limited["n"] == 2 and limited["image_size"] == 16


# ---------------------------------------------------------------------------------------------------
# Conditioning and bad input


def test_balanced_labels_cycle_through_the_classes() -> None:
    labels = balanced_labels(23, 10)
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23
    with pytest.raises(ValueError, match="num_classes"):
        balanced_labels(5, 0)


def test_text_model_samples_are_prompted_with_captions_naming_their_class(tmp_path) -> None:
    encoder = make_tiny_t5(tmp_path / "t5")
    config = MDMConfig(model=tiny_config(text_dim=32), diffusion=DiffusionConfig(), text_encoder=f"t5:{encoder}")
    pipe = MatryoshkaPipeline(random_model(config.model), config)
    samples = generate_samples(pipe, EvalSettings(num_samples=12, steps=1, batch_size=5), progress=False)
    assert samples.kind == "caption" and samples.images.shape == (12, 1, 32, 32)
    assert samples.labels is not None and samples.labels.tolist() == [i % 10 for i in range(12)]
    assert samples.captions is not None and len(set(samples.captions)) > 1
    assert all(caption_names_class(c, int(y)) for c, y in zip(samples.captions, samples.labels, strict=True))
    again = generate_samples(pipe, EvalSettings(num_samples=12, steps=1, batch_size=5), progress=False)
    assert again.captions == samples.captions and torch.equal(again.images, samples.images)


def test_unconditional_samples_and_grids() -> None:
    config = MDMConfig(model=tiny_config(), diffusion=DiffusionConfig())
    pipe = MatryoshkaPipeline(random_model(config.model), config)
    samples = generate_samples(pipe, EvalSettings(num_samples=3, steps=1), progress=False)
    assert samples.kind == "unconditional" and samples.labels is None and samples.images.shape == (3, 1, 32, 32)
    assert sample_grid(samples, None).size == (3 * 34 + 2, 34 + 2)
    # class grids: one row per class, 8 cells each, at most 16 rows however many classes there are
    many = Samples(images=torch.zeros(40, 1, 8, 8), labels=torch.arange(40) % 20, captions=None, kind="class")
    assert sample_grid(many, [str(i) for i in range(20)]).size == (8 * 10 + 2, 16 * 10 + 2)


def test_eval_samples_in_the_precision_it_is_given() -> None:
    config = MDMConfig(model=tiny_config(), diffusion=DiffusionConfig())
    pipe = MatryoshkaPipeline(random_model(config.model), config)
    dtypes = []
    pipe.model.conv_out.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    low = generate_samples(pipe, EvalSettings(num_samples=3, steps=2, precision="bf16"), progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    full = generate_samples(pipe, EvalSettings(num_samples=3, steps=2), progress=False)
    assert set(dtypes[len(dtypes) // 2:]) == {torch.float32} and not torch.equal(low.images, full.images)
    with pytest.raises(ValueError, match="precision"):
        EvalSettings(precision="half").validate()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num-samples", "1"], "num_samples"),
        (["--steps", "0"], "steps"),
        (["--guidance", "two"], "--guidance"),
        (["--reference", "/no/such/folder"], "neither 'fashion_mnist' nor an existing image folder"),
    ],
)
def test_bad_arguments_are_refused_with_the_problem_named(tmp_path, class_model_dir, capsys, extra, message) -> None:
    args = ["eval", "--model", str(class_model_dir), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]
    assert cli.main(args + ["--no-classifier", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_missing_model_and_mismatched_classifier_are_refused(tmp_path, class_model_dir, capsys) -> None:
    assert cli.main(["eval", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    classifier = save_tiny_classifier(tmp_path / "clf10", num_classes=10)
    code = cli.main([
        "eval", "--model", str(class_model_dir), "--classifier", str(classifier), "--out", str(tmp_path / "o"),
        "--cache-dir", str(tmp_path), "--num-samples", "4", "--quiet",
    ])
    assert code == 2
    assert "10 classes but the model asks for 3" in capsys.readouterr().err
