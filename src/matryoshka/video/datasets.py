"""Video clips from a folder of files or from webdataset tar shards, with sidecar captions.

Both yield `{"video": (C, T, S, S) float in [-1, 1], "caption": str, "label": -1}` and count bad clips
in a `FaultCounter` instead of crashing (see matryoshka.video.decoding for the fault kinds).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matryoshka.data import FaultCounter, FaultTolerantFolder, SampleFault, ShardDataset
from matryoshka.data.decoding import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_MAX_IMAGE_BYTES, clean_caption, read_file_bytes

from .decoding import VIDEO_EXTENSIONS, decode_clip

# Shard members looked for in this order when a sample has several videos.
_VIDEO_PRIORITY: tuple[str, ...] = ("mp4", "webm", *sorted(VIDEO_EXTENSIONS - {"mp4", "webm"}))
DEFAULT_MAX_VIDEO_BYTES = 4 * DEFAULT_MAX_IMAGE_BYTES


def _check_clip_args(num_frames: int, image_size: int, channels: int, stride: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


class VideoFolderDataset(FaultTolerantFolder):
    """Videos under `root` (recursively; mp4, webm, gif, mkv, avi, mov, ...) as clips of `num_frames` frames.

    `clip.mp4` takes its caption from `clip.txt` beside it ("" when there is none). Frames are taken
    `stride` apart; the start is the first frame, or random per (seed, epoch, index) with
    random_start=True. A bad file is counted once per request in `faults` and replaced by the next good
    one, so a DataLoader never crashes on it; `faults` raises DataFaultError once too many are bad.
    """

    kind = "videos"

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_frames: int,
        image_size: int,
        channels: int = 3,
        stride: int = 1,
        random_start: bool = False,
        seed: int = 0,
        captions: bool = True,
        faults: FaultCounter | None = None,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
        max_video_bytes: int | None = DEFAULT_MAX_VIDEO_BYTES,
    ) -> None:
        _check_clip_args(num_frames, image_size, channels, stride)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist or is not a directory")
        self.paths = self.find(self.root, VIDEO_EXTENSIONS, self.kind)
        self.num_frames, self.image_size, self.channels, self.stride = num_frames, image_size, channels, stride
        self.random_start, self.seed, self.captions = random_start, seed, captions
        self.faults = faults if faults is not None else FaultCounter()
        self.max_caption_chars, self.max_video_bytes = max_caption_chars, max_video_bytes
        self.epoch = 0
        self._known_bad = {}

    def set_epoch(self, epoch: int) -> None:
        """Vary the random starts per epoch."""
        self.epoch = int(epoch)

    def _load(self, index: int, count_notes: bool) -> dict[str, Any]:
        path = self.paths[index]
        data = read_file_bytes(path, self.max_video_bytes)
        rng = random.Random(f"video-folder/{self.seed}/{self.epoch}/{index}")
        video = decode_clip(
            data, self.num_frames, self.image_size, self.channels, self.stride,
            start=None if self.random_start else 0, rng=rng,
        )
        caption = self.sidecar_caption(path, count_notes) if self.captions else ""
        return {"video": video, "caption": caption, "label": -1}


class VideoShardDataset(ShardDataset):
    """Video-text samples from webdataset tar shards (`key.mp4` + `key.txt`), streamed like ShardDataset.

    Shard order, rank/worker splitting, shuffle buffers, repeat and fault counting are ShardDataset's;
    only the decoding differs: the sample's video member becomes a clip of `num_frames` frames `stride`
    apart (random start per sample when random_start=True, else the first frame).
    """

    def __init__(
        self,
        urls_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        num_frames: int,
        image_size: int,
        channels: int = 3,
        stride: int = 1,
        random_start: bool = False,
        max_member_bytes: int | None = DEFAULT_MAX_VIDEO_BYTES,
        **shard_options: Any,
    ) -> None:
        _check_clip_args(num_frames, image_size, channels, stride)
        super().__init__(
            urls_or_paths, image_size=image_size, channels=channels, max_member_bytes=max_member_bytes, **shard_options
        )
        self.num_frames, self.stride, self.random_start = num_frames, stride, random_start

    def _decode(self, group: dict[str, Any]) -> dict[str, Any]:
        """Raw tar group -> sample, or raise SampleFault."""
        if group.get("__oversize__"):
            raise SampleFault("oversize_file", group["__key__"])
        extension = next((ext for ext in _VIDEO_PRIORITY if ext in group), None)
        if extension is None:
            raise SampleFault("missing_image", f"{group['__shard__']}: {group['__key__']} has no video member")
        rng = random.Random(f"video-shard/{self.seed}/{self.epoch}/{group['__shard__']}/{group['__key__']}")
        video = decode_clip(
            group[extension], self.num_frames, self.image_size, self.channels, self.stride,
            start=None if self.random_start else 0, rng=rng,
        )
        caption = clean_caption(
            group.get("txt"), max_chars=self.max_caption_chars, required=self.require_caption, faults=self.faults
        )
        return {"video": video, "caption": caption, "label": -1}
