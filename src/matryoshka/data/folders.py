"""A folder of images (searched recursively) with optional sidecar captions, as a map-style Dataset."""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .decoding import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_EXTENSIONS,
    clean_caption,
    decode_image,
    read_file_bytes,
)
from .faults import DataFaultError, FaultCounter, SampleFault


class FaultTolerantFolder(Dataset, abc.ABC):
    """A sorted list of files under a folder, each decoded by `_load`; bad files are counted and skipped.

    Subclasses set `self.paths`, `self.root`, `self.faults`, `self.max_caption_chars` and implement
    `_load(index, count_notes)`, raising SampleFault for a bad file. `__getitem__` counts the outcome of
    the requested index exactly once per request (so that over an epoch the counts equal the numbers of
    good and bad files) and substitutes the next good file, uncounted, for a bad one.
    """

    kind = "files"  # what the files are, for messages: "images", "videos"
    paths: list[Path]
    root: Path
    faults: FaultCounter
    max_caption_chars: int
    _known_bad: dict[int, str]  # per process: index -> fault kind, so bad files are not decoded again

    @staticmethod
    def find(root: Path, extensions: set[str] | frozenset[str], kind: str) -> list[Path]:
        """Files under `root` (recursively) with one of `extensions` (case-insensitive), sorted."""
        paths = sorted(p for p in root.rglob("*") if p.suffix[1:].lower() in extensions and p.is_file())
        if not paths:
            raise ValueError(f"no {kind} found under {root} (looked for: {', '.join(sorted(extensions))})")
        return paths

    def sidecar_caption(self, path: Path, count_notes: bool) -> str:
        """`path`'s caption from the .txt file beside it, cleaned; "" when there is none."""
        sidecar = path.with_suffix(".txt")
        raw = read_file_bytes(sidecar, None) if sidecar.is_file() else None
        notes = self.faults if count_notes else None
        return clean_caption(raw, max_chars=self.max_caption_chars, required=False, faults=notes)

    def __len__(self) -> int:
        return len(self.paths)

    @abc.abstractmethod
    def _load(self, index: int, count_notes: bool) -> dict[str, Any]:
        """Decode file `index` or raise SampleFault; caption notes are counted only when `count_notes`."""

    def _try(self, index: int, count_notes: bool) -> dict[str, Any] | SampleFault:
        if index in self._known_bad:
            return SampleFault(self._known_bad[index])
        try:
            return self._load(index, count_notes)
        except SampleFault as fault:
            self._known_bad[index] = fault.kind
            return fault

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} {self.kind} in {self.root}")
        index %= n
        result = self._try(index, count_notes=True)
        if not isinstance(result, SampleFault):
            self.faults.record_ok()
            return result
        self.faults.record_failure(result.kind)
        for offset in range(1, n):
            substitute = self._try((index + offset) % n, count_notes=False)
            if not isinstance(substitute, SampleFault):
                return substitute
        raise DataFaultError(f"none of the {n} {self.kind} under {self.root} could be loaded: {self.faults.report()}")


class ImageFolderDataset(FaultTolerantFolder):
    """Images under `root` as `{"image": (C, S, S) float in [-1, 1], "label": -1, "caption": str}`.

    Each image is resized (shorter side to `image_size`, bicubic) and centre-cropped. With `captions=True`,
    `photo.jpg` takes its caption from `photo.txt` beside it (UTF-8), or "" when there is none.

    A bad item (undecodable or truncated image, non-UTF-8 caption, file gone since the scan) is counted
    in `faults` once per request and replaced by the next good item, so a DataLoader never crashes on it;
    `faults` raises DataFaultError once too many items are bad (see FaultCounter).

    Args:
        root: directory to search recursively for files with IMAGE_EXTENSIONS (case-insensitive).
        image_size: S, the side of the square output.
        channels: 1 (grayscale) or 3 (RGB).
        captions: read sidecar captions; False gives "" for every item.
        faults: a shared FaultCounter; a default one is made when None.
        max_caption_chars: longer captions are truncated (and counted as a note).
        max_image_bytes: larger files are skipped (and counted) without being read.
    """

    kind = "images"

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int,
        channels: int = 3,
        captions: bool = True,
        faults: FaultCounter | None = None,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
        max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.paths = self.find(self.root, IMAGE_EXTENSIONS, self.kind)
        self.image_size, self.channels, self.captions = image_size, channels, captions
        self.faults = faults if faults is not None else FaultCounter()
        self.max_caption_chars, self.max_image_bytes = max_caption_chars, max_image_bytes
        self._known_bad = {}

    def _load(self, index: int, count_notes: bool) -> dict[str, Any]:
        """Decode one item or raise SampleFault; caption notes are counted only when `count_notes`."""
        path = self.paths[index]
        image: torch.Tensor = decode_image(
            read_file_bytes(path, self.max_image_bytes), self.image_size, self.channels
        )
        caption = self.sidecar_caption(path, count_notes) if self.captions else ""
        return {"image": image, "label": -1, "caption": caption}
