"""The small CNN classifier and conditioning accuracy, on synthetic separable images."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from matryoshka.evaluation import (
    ClassifierConfig,
    SmallCNNClassifier,
    conditioning_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)

NUM_CLASSES = 4
SIZE = 16


def quadrant_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, 1, 16, 16) in [-1, 1]: class c is a bright square in quadrant c, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    images = -0.8 + 0.3 * torch.randn(len(labels), 1, SIZE, SIZE, generator=generator)
    half = SIZE // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 1.6
    return images.clamp(-1, 1)


def balanced_labels(n: int, seed: int) -> torch.Tensor:
    return torch.arange(n) % NUM_CLASSES


@pytest.fixture(scope="module")
def trained() -> SmallCNNClassifier:
    labels = balanced_labels(256, seed=0)
    dataset = TensorDataset(quadrant_images(labels, seed=0), labels)
    config = ClassifierConfig(in_channels=1, image_size=SIZE, num_classes=NUM_CLASSES, width=8)
    return train_classifier(dataset, epochs=3, config=config, batch_size=32, lr=5e-3, progress=False)


def test_config_is_inferred_from_the_dataset() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    dataset = TensorDataset(torch.zeros(8, 3, 8, 8), labels)
    model = train_classifier(dataset, epochs=1, batch_size=4, progress=False)
    assert model.config == ClassifierConfig(in_channels=3, image_size=8, num_classes=3)


def test_classifier_learns_separable_patterns(trained) -> None:
    assert not trained.training
    labels = balanced_labels(200, seed=1)
    overall, per_class = conditioning_accuracy(trained, quadrant_images(labels, seed=1), labels)
    assert overall > 0.95
    assert set(per_class) == set(range(NUM_CLASSES))
    assert min(per_class.values()) > 0.85


def test_conditioning_accuracy_counts_requested_classes(trained) -> None:
    labels = balanced_labels(80, seed=2)
    images = quadrant_images(labels, seed=2)
    predictions = trained.predict(images)
    # ask for the wrong class on every sample of class 0 and 1: those samples now "fail"
    requested = labels.clone()
    requested[labels == 0] = 1
    requested[labels == 1] = 0
    overall, per_class = conditioning_accuracy(trained, images, requested.tolist())
    assert overall == pytest.approx((predictions == requested).float().mean().item())
    for c in range(NUM_CLASSES):
        expected = (predictions[requested == c] == c).float().mean().item()
        assert per_class[c] == pytest.approx(expected)
    assert per_class[0] < 0.2 and per_class[1] < 0.2
    assert per_class[2] > 0.8 and per_class[3] > 0.8


def test_conditioning_accuracy_only_reports_requested_classes(trained) -> None:
    labels = torch.tensor([2, 2, 3])
    _, per_class = conditioning_accuracy(trained, quadrant_images(labels, seed=3), labels)
    assert set(per_class) == {2, 3}


def test_save_load_round_trip(trained, tmp_path) -> None:
    directory = save_classifier(trained, tmp_path / "clf")
    config = json.loads((directory / "classifier.json").read_text())
    assert config["num_classes"] == NUM_CLASSES and config["image_size"] == SIZE
    loaded = load_classifier(directory)
    images = quadrant_images(balanced_labels(8, seed=4), seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), trained(images))
    assert loaded.config == trained.config
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_classifier(tmp_path / "nowhere")


def test_rgb_32px_config_accepts_rgb_and_grey_images() -> None:
    model = SmallCNNClassifier(ClassifierConfig(in_channels=3, image_size=32, num_classes=10, width=4)).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(model(grey), model(grey.repeat(1, 3, 1, 1)))


def test_bad_inputs_raise_clear_errors(trained) -> None:
    with pytest.raises(ValueError, match="16x16"):
        trained.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="1-channel"):
        trained.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        conditioning_accuracy(trained, torch.zeros(2, 1, 16, 16), [0, 7])
    with pytest.raises(ValueError, match="one label per image"):
        conditioning_accuracy(trained, torch.zeros(2, 1, 16, 16), [0])
    with pytest.raises(ValueError, match="multiple of 4"):
        ClassifierConfig(image_size=30)
    with pytest.raises(ValueError, match="in_channels"):
        ClassifierConfig(in_channels=2)
