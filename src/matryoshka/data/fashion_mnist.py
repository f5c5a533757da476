"""Fashion-MNIST (Zalando, 28x28 grayscale, 10 classes) as a map-style torch Dataset.

Files are read from the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), else
from a cache directory (`$MATRYOSHKA_CACHE/fashion-mnist`, default ~/.cache/matryoshka/fashion-mnist),
downloading the four IDX files from the canonical sources only when they are missing there, and never
when MATRYOSHKA_OFFLINE=1 (or HF_HUB_OFFLINE=1) is set.
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from matryoshka.atomic import atomic_path

from .captions import caption_for_label
from .transforms import uint8_to_tensor

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_URLS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_SIZES = {"train": 60000, "test": 10000}
_NATIVE_SIZE = 28
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are neither installed nor cached, and could not be downloaded."""


def default_cache_dir() -> Path:
    """`$MATRYOSHKA_CACHE/fashion-mnist`, or ~/.cache/matryoshka/fashion-mnist."""
    base = os.environ.get("MATRYOSHKA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "matryoshka") / "fashion-mnist"


def download_file(url: str, destination: Path, timeout: float = 60.0) -> None:
    """Download `url` to `destination` atomically (a partial download never looks like a good file)."""
    with (
        atomic_path(destination) as temporary,
        open(temporary, "wb") as handle,
        urllib.request.urlopen(url, timeout=timeout) as response,
    ):
        shutil.copyfileobj(response, handle)


OFFLINE_VARIABLES = ("MATRYOSHKA_OFFLINE", "HF_HUB_OFFLINE")


def offline() -> bool:
    """Whether run-time downloads are off: MATRYOSHKA_OFFLINE or HF_HUB_OFFLINE set to 1/true/yes."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _download_split(directory: Path, split: str) -> None:
    """Fetch the split's missing files into `directory`, trying each source in turn."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in _FILES[split]:
        if _find(directory, stem) is not None:
            continue
        errors = []
        for base in SOURCE_URLS:
            url = f"{base}{stem}.gz"
            try:
                download_file(url, directory / f"{stem}.gz")
                _read_idx(directory / f"{stem}.gz")  # reject HTML error pages and partial files
                break
            except Exception as error:  # network errors come in many types; all mean "try the next source"
                (directory / f"{stem}.gz").unlink(missing_ok=True)
                errors.append(f"{url}: {type(error).__name__}: {error}")
        else:
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {stem}.gz is not installed in {DEBIAN_DIR} nor cached in {directory}, "
                f"and downloading it failed ({'; '.join(errors)}). Install the Debian package with "
                f"`{INSTALL_HINT}`, or put the four *-ubyte.gz files from "
                f"https://github.com/zalandoresearch/fashion-mnist into {directory}."
            )


def resolve_files(split: str, root: str | os.PathLike[str] | None = None, download: bool = True) -> tuple[Path, Path]:
    """(images, labels) file paths for `split`, downloading into the cache (or `root`) if needed."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    candidates = [Path(root)] if root is not None else [DEBIAN_DIR, default_cache_dir()]
    for directory in candidates:
        found = [_find(directory, stem) for stem in _FILES[split]]
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    target = candidates[-1]
    if download and offline():
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files are not in {', '.join(map(str, candidates))}, and downloads are off "
            f"({OFFLINE_VARIABLES[0]} or HF_HUB_OFFLINE is set). Install them with `{INSTALL_HINT}`, or unset it "
            "to download them once into the cache."
        )
    if not download:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found in {', '.join(map(str, candidates))} and download=False. "
            f"Install them with `{INSTALL_HINT}`."
        )
    _download_split(target, split)
    images, labels = (_find(target, stem) for stem in _FILES[split])
    assert images is not None and labels is not None
    return images, labels


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(data) - header} follow")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    array.flags.writeable = False
    return array


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a read-only uint8 array; cached per path and mtime."""
    return _read_idx_cached(str(path), path.stat().st_mtime_ns)


def load_arrays(
    split: Literal["train", "test"] = "train", root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays: images uint8 (N, 28, 28) and labels uint8 (N,), N = 60000 (train) or 10000 (test)."""
    images_path, labels_path = resolve_files(split, root, download)
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    n = _SPLIT_SIZES[split]
    if images.shape != (n, _NATIVE_SIZE, _NATIVE_SIZE) or labels.shape != (n,):
        raise ValueError(
            f"unexpected Fashion-MNIST {split} shapes: images {images.shape} (want {(n, 28, 28)}), "
            f"labels {labels.shape} (want {(n,)}) from {images_path}, {labels_path}"
        )
    if int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST has 10 classes")
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST items as `{"image": (C, S, S) float in [-1, 1], "label": int, "caption": str}`.

    Args:
        split: "train" (60000) or "test" (10000).
        image_size: S. With fit="pad" the 28x28 image is centred on a black canvas (S=32: 2 px each side);
            with fit="resize" it is resized with PIL bicubic.
        channels: 1 (grayscale) or 3 (the gray value repeated, for RGB models).
        root: directory holding the IDX files; None searches the Debian package, then the cache.
        caption_seed: captions are drawn from `caption_for_label` with a RNG seeded by
            (caption_seed, epoch, index), so a given epoch is reproducible; None draws fresh randomness.
        download: allow downloading missing files (never needed when the Debian package is installed).
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        image_size: int = 32,
        channels: int = 1,
        root: str | os.PathLike[str] | None = None,
        fit: Literal["pad", "resize"] = "pad",
        caption_seed: int | None = 0,
        download: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if fit not in ("pad", "resize"):
            raise ValueError(f"fit must be 'pad' or 'resize', got {fit!r}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if fit == "pad" and image_size < _NATIVE_SIZE:
            raise ValueError(
                f"fit='pad' needs image_size >= 28 (Fashion-MNIST is 28x28), got {image_size}; use fit='resize'"
            )
        self.split, self.image_size, self.channels, self.fit = split, image_size, channels, fit
        self.caption_seed = caption_seed
        self.epoch = 0
        self.images, self.labels = load_arrays(split, root, download)

    def set_epoch(self, epoch: int) -> None:
        """Vary the captions per epoch (as with DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def image_tensor(self, index: int) -> torch.Tensor:
        """The image at `index` as a float tensor (C, S, S) in [-1, 1]."""
        pixels = self.images[index]
        if self.fit == "pad":
            before = (self.image_size - _NATIVE_SIZE) // 2
            after = self.image_size - _NATIVE_SIZE - before
            pixels = np.pad(pixels, ((before, after), (before, after)))  # 0 = the black background
        elif self.image_size != _NATIVE_SIZE:
            resized = Image.fromarray(pixels).resize((self.image_size, self.image_size), Image.BICUBIC)
            pixels = np.asarray(resized)
        tensor = uint8_to_tensor(pixels)
        return tensor.expand(3, -1, -1).contiguous() if self.channels == 3 else tensor

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for Fashion-MNIST {self.split} ({len(self)} items)")
        index = index % len(self)
        label = int(self.labels[index])
        rng = None if self.caption_seed is None else random.Random(f"{self.caption_seed}/{self.epoch}/{index}")
        return {"image": self.image_tensor(index), "label": label, "caption": caption_for_label(label, rng)}
