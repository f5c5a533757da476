"""Fashion-MNIST, captions, transforms and the image-folder dataset (good inputs; faults are in test_data_faults)."""

from __future__ import annotations

import random
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.data import (
    CLASS_NAMES,
    CLASS_SYNONYMS,
    TEMPLATES,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolderDataset,
    all_captions_for_label,
    caption_for_label,
    caption_names_class,
    classes_named_in,
    convert_channels,
    load_arrays,
    make_grid,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
)
from matryoshka.data import fashion_mnist as fmnist

# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_test_items_have_the_documented_format() -> None:
    dataset = FashionMNIST("test")
    raw_images, raw_labels = load_arrays("test")
    assert len(dataset) == 10000
    for index in (0, 1, 4321, 9999, -1):
        item = dataset[index]
        assert set(item) == {"image", "label", "caption"}
        image = item["image"]
        assert image.shape == (1, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert isinstance(item["label"], int) and item["label"] == int(raw_labels[index])
        assert classes_named_in(item["caption"]) == {item["label"]}
        # 2 px of black (-1) on every side, the native pixels in the middle.
        centre = image[0, 2:30, 2:30]
        assert torch.equal(centre, torch.from_numpy(raw_images[index].copy()).float() / 127.5 - 1.0)
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(image[0][border] == -1.0)
    with pytest.raises(IndexError):
        dataset[10000]


def test_fashion_mnist_train_split_and_labels() -> None:
    images, labels = load_arrays("train")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert len(CLASS_NAMES) == 10 == len(CLASS_SYNONYMS)
    assert CLASS_NAMES[7] == "Sneaker" and CLASS_NAMES[9] == "Ankle boot"


def test_fashion_mnist_pad_versus_resize_and_channels() -> None:
    padded_set = FashionMNIST("test", image_size=32, fit="pad")
    resized_set = FashionMNIST("test", image_size=32, fit="resize")
    raw_images, _ = load_arrays("test")
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[2:30, 2:30] = False
    resized_touches_frame = 0
    for index in range(20):
        padded, resized = padded_set[index]["image"], resized_set[index]["image"]
        assert padded.shape == resized.shape == (1, 32, 32)
        expected = np.asarray(Image.fromarray(raw_images[index]).resize((32, 32), Image.BICUBIC))
        assert torch.equal(resized[0], torch.from_numpy(expected.copy()).float() / 127.5 - 1.0)
        assert torch.all(padded[0][frame] == -1)  # padding leaves a black frame ...
        resized_touches_frame += int(torch.any(resized[0][frame] > -1))  # ... resizing stretches into it
    assert resized_touches_frame >= 10
    small = FashionMNIST("test", image_size=16, fit="resize", channels=3)[0]["image"]
    assert small.shape == (3, 16, 16) and small.min() >= -1 and small.max() <= 1
    assert torch.equal(small[0], small[1]) and torch.equal(small[1], small[2])
    with pytest.raises(ValueError, match="fit='resize'"):
        FashionMNIST("test", image_size=16, fit="pad")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST("validation")  # type: ignore[arg-type]


def test_fashion_mnist_captions_are_reproducible_per_epoch() -> None:
    dataset = FashionMNIST("test")
    first = [dataset[i]["caption"] for i in range(40)]
    assert first == [FashionMNIST("test")[i]["caption"] for i in range(40)]
    dataset.set_epoch(1)
    assert [dataset[i]["caption"] for i in range(40)] != first


def _no_network(url: str, destination: Path, timeout: float = 60.0) -> None:
    raise urllib.error.URLError("network is unreachable (test)")


def test_fashion_mnist_absent_and_offline_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    for name in fmnist.OFFLINE_VARIABLES:  # downloads allowed, but the network is down
        monkeypatch.delenv(name, raising=False)
    calls: list[str] = []

    def failing(url: str, destination: Path, timeout: float = 60.0) -> None:
        calls.append(url)
        _no_network(url, destination)

    monkeypatch.setattr(fmnist, "download_file", failing)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        FashionMNIST("train", root=tmp_path)
    assert str(tmp_path) in str(info.value)
    assert len(calls) == len(fmnist.SOURCE_URLS)  # every canonical source was tried
    canonical = ("https://raw.githubusercontent.com/zalandoresearch/", "http://fashion-mnist.s3")
    assert all(url.startswith(canonical) for url in calls)
    assert list(tmp_path.iterdir()) == []  # no partial files left behind
    with pytest.raises(DatasetNotFoundError, match="download=False"):
        FashionMNIST("test", root=tmp_path, download=False)


def test_fashion_mnist_downloads_missing_files_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    # Pretend the Debian package is absent; the "download" copies the installed files (no network in tests).
    for name in fmnist.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("MATRYOSHKA_CACHE", str(tmp_path / "cache"))
    fetched: list[str] = []

    def copy_from_debian(url: str, destination: Path, timeout: float = 60.0) -> None:
        fetched.append(url)
        if "raw.githubusercontent" in url:
            destination.write_bytes(b"<html>rate limited</html>")  # a bad answer: must fall back to S3
            return
        shutil.copy(Path("/usr/share/datasets/fashion-mnist") / url.rsplit("/", 1)[1], destination)

    monkeypatch.setattr(fmnist, "download_file", copy_from_debian)
    dataset = FashionMNIST("test")
    cache = tmp_path / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert len(fetched) == 4 and len(dataset) == 10000
    # Second time: found in the cache, nothing fetched.
    fetched.clear()
    assert len(FashionMNIST("test")) == 10000 and fetched == []


def test_idx_parser_rejects_a_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))  # header says 10, 5 follow
    with pytest.raises(ValueError, match="header says"):
        fmnist._read_idx(bad)


# ---------------------------------------------------------------- captions


def test_captions_are_varied_and_name_exactly_their_class() -> None:
    rng = random.Random(1234)
    for label in range(10):
        captions = [caption_for_label(label, rng) for _ in range(400)]
        assert len(set(captions)) >= 20, (label, len(set(captions)))
        assert all(classes_named_in(c) == {label} for c in captions)
        possible = all_captions_for_label(label)
        assert len(possible) >= 8 * 4 and all(caption_names_class(c, label) for c in possible)
    assert len(TEMPLATES) >= 8 and all(len(nouns) >= 4 for nouns in CLASS_SYNONYMS)


def test_caption_for_label_is_deterministic_given_rng() -> None:
    a = [caption_for_label(3, random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1
    rng1, rng2 = random.Random(99), random.Random(99)
    assert [caption_for_label(i % 10, rng1) for i in range(50)] == [caption_for_label(i % 10, rng2) for i in range(50)]
    for bad in (-1, 10, 2.0, True):
        with pytest.raises(ValueError, match="label"):
            caption_for_label(bad)  # type: ignore[arg-type]


def test_templates_alone_name_no_class() -> None:
    for template in TEMPLATES:
        assert classes_named_in(template.format(a="something", n="something")) == set(), template


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A T-Shirt on a table", {0}),
        ("a plain shirt", {6}),
        ("two Sneakers and a t-shirt", {0, 7}),
        ("some ANKLE   boots", {9}),
        ("a pair of trainers", {7}),
        ("a sweatshirt", {2}),
        ("a raincoat", {4}),
        ("a photo of a cat", set()),
        ("", set()),
    ],
)
def test_classes_named_in_examples(caption: str, expected: set[int]) -> None:
    assert classes_named_in(caption) == expected


# ---------------------------------------------------------------- transforms


def test_pil_tensor_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (5, 7, 3)):
        array = rng.integers(0, 256, size=shape, dtype=np.uint8)
        tensor = pil_to_tensor(Image.fromarray(array))
        assert tensor.shape == ((1, 5, 7) if len(shape) == 2 else (3, 5, 7))
        assert tensor.min() >= -1 and tensor.max() <= 1
        assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)
    assert np.asarray(tensor_to_pil(torch.full((1, 2, 2), 3.0))).max() == 255  # clipped, not wrapped


def test_resize_center_crop_shapes_and_centre() -> None:
    # A 40x20 landscape image: black 6-column margins, white inside; the central 20x20 square is all white.
    array = np.zeros((20, 40), dtype=np.uint8)
    array[:, 6:34] = 255
    out = resize_center_crop(Image.fromarray(array), 10)
    assert out.size == (10, 10)
    assert np.asarray(out).min() >= 250  # the crop is the white centre, the black margins are gone
    assert np.asarray(resize_center_crop(Image.fromarray(array), 40)).shape == (40, 40)  # upscaling works
    assert resize_center_crop(Image.new("RGB", (13, 57)), 8).size == (8, 8)


def test_convert_channels_composites_transparency_on_white() -> None:
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(convert_channels(transparent, 3)).min() == 255
    assert convert_channels(Image.new("RGB", (4, 4)), 1).mode == "L"
    with pytest.raises(ValueError, match="channels"):
        convert_channels(transparent, 2)


def test_make_grid_places_images_in_rows() -> None:
    images = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0)])  # black, gray, white
    grid = make_grid(images, nrow=2, padding=1, pad_value=1.0)
    assert grid.size == (2 * 5 + 3, 2 * 4 + 3) and grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert (pixels[1:5, 1:6] == 0).all()  # first image, top left
    assert (pixels[1:5, 7:12] == 128).all()  # second image, top right
    assert (pixels[6:10, 1:6] == 255).all()  # third image, second row
    assert (pixels[0] == 255).all()  # padding
    assert make_grid(torch.zeros(1, 1, 3, 3), nrow=4, padding=0).size == (3, 3)
    with pytest.raises(ValueError, match="N, C, H, W"):
        make_grid(torch.zeros(3, 4, 5))


# ---------------------------------------------------------------- image folders


def _save(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_finds_images_recursively_with_captions(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", (30, 20), (255, 0, 0))
    (tmp_path / "a.txt").write_text("  a red\nrectangle ", encoding="utf-8")
    _save(tmp_path / "sub" / "deeper" / "b.JPG", (16, 40), (0, 0, 255))
    _save(tmp_path / "sub" / "c.webp", (12, 12), (0, 255, 0))
    (tmp_path / "notes.md").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.paths] == ["a.png", "sub/c.webp", "sub/deeper/b.JPG"]
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["caption"] for item in items] == ["a red rectangle", "", ""]
    assert all(item["image"].shape == (3, 8, 8) and item["label"] == -1 for item in items)
    assert items[0]["image"][0].min() > 0.99 and items[0]["image"][1].max() < -0.99  # red
    gray = ImageFolderDataset(tmp_path, image_size=8, channels=1, captions=False)
    assert gray[0]["image"].shape == (1, 8, 8) and gray[0]["caption"] == ""
    assert dataset.faults.report()["failed"] == 0 and dataset.faults.ok == 3


def test_image_folder_rejects_missing_or_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", image_size=8)
    with pytest.raises(ValueError, match="no images found"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_fashion_mnist_never_downloads_when_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("MATRYOSHKA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MATRYOSHKA_OFFLINE", "1")
    monkeypatch.setattr(fmnist, "download_file", lambda *a, **k: pytest.fail("downloaded while offline"))
    with pytest.raises(DatasetNotFoundError, match="downloads are off"):
        FashionMNIST("test")
