"""Video bytes or files -> clips (C, T, S, S) in [-1, 1], with PyAV; faults raise `SampleFault`.

A clip is `num_frames` frames taken `stride` frames apart, each resized (shorter side to S, bicubic)
and centre-cropped like the image loaders do. Only the frames needed are converted; decoding stops
after the last one.

Fault kinds (matryoshka.data.faults has no video-specific kinds; the image ones carry the same meaning):
- "corrupt_image": bytes no decoder understands, no video stream, or a clip with fewer than
  `num_frames` frames (detail says which);
- "truncated_image": the stream ends before the frame count its header announced.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from matryoshka.data import SampleFault, convert_channels, pil_to_tensor, resize_center_crop

VIDEO_EXTENSIONS: frozenset[str] = frozenset({"mp4", "webm", "gif", "mkv", "avi", "mov", "m4v", "ogv"})

VideoSource = bytes | str | os.PathLike[str]


def frame_indices(
    total: int, num_frames: int, stride: int, start: int | None = 0, rng: random.Random | None = None
) -> list[int]:
    """Which of `total` frames make the clip: start, start + s, ..., start + (num_frames - 1) s.

    The stride shrinks (down to 1) when the clip is too short for it, so short videos still give a clip
    spanning their whole length. start=None draws the start uniformly (with `rng`) among those that fit.
    Raises ValueError when total < num_frames.
    """
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    if total < num_frames:
        raise ValueError(f"the video has {total} frames, fewer than the {num_frames} a clip needs")
    stride = min(stride, (total - 1) // max(num_frames - 1, 1)) if num_frames > 1 else stride
    span = (num_frames - 1) * stride + 1
    latest = total - span
    if start is None:
        start = (rng or random.Random()).randint(0, latest)
    elif not 0 <= start <= latest:
        start = min(max(start, 0), latest)
    return [start + i * stride for i in range(num_frames)]


def require_av() -> ModuleType:
    """PyAV, imported on first use so that the rest of matryoshka.video works without it."""
    try:
        import av
    except ImportError as error:
        raise ImportError(
            "reading and writing video files needs PyAV: pip install 'matryoshka-diffusion[video]' (or: pip install av)"
        ) from error
    return av


def _open(source: VideoSource) -> Any:
    av = require_av()
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source), mode="r")


def _video_frames(container: Any) -> Iterator[Any]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    yield from container.decode(stream)


def count_frames(source: VideoSource) -> int:
    """Number of frames of the first video stream: the header's count, else the packets' (no decoding)."""
    with _open(source) as container:
        if not container.streams.video:
            raise SampleFault("corrupt_image", "no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def decode_clip(
    source: VideoSource,
    num_frames: int,
    image_size: int,
    channels: int = 3,
    stride: int = 1,
    start: int | None = 0,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Video bytes or a path -> float tensor (channels, num_frames, image_size, image_size) in [-1, 1].

    start=None picks a random start with `rng` (training); an int is clamped into the video. Raises
    SampleFault ("corrupt_image" / "truncated_image", see the module docstring) for bad input.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    av = require_av()
    try:
        total = count_frames(source)
        try:
            wanted = frame_indices(total, num_frames, stride, start, rng)
        except ValueError as error:
            raise SampleFault("corrupt_image", f"video too short: {error}") from error
        frames: list[torch.Tensor] = []
        decoded = 0
        with _open(source) as container:
            wanted_set, last = set(wanted), wanted[-1]
            for index, frame in enumerate(_video_frames(container)):
                decoded = index + 1
                if index in wanted_set:
                    image = resize_center_crop(convert_channels(frame.to_image(), channels), image_size)
                    frames.append(pil_to_tensor(image))
                if index >= last:
                    break
        if len(frames) < num_frames:
            raise SampleFault(
                "truncated_image",
                f"the video stream ended after {decoded} decodable frames; "
                f"its header announced {total}",
            )
    except SampleFault:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as error:
        raise SampleFault("corrupt_image", f"undecodable video: {type(error).__name__}: {error}") from error
    return torch.stack(frames, dim=1)


def read_video(source: VideoSource, channels: int = 3) -> torch.Tensor:
    """Every frame at its own size: float tensor (channels, T, H, W) in [-1, 1] (for tests and tools)."""
    av = require_av()
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise SampleFault("corrupt_image", "no video stream")
            frames = [pil_to_tensor(convert_channels(f.to_image(), channels)) for f in _video_frames(container)]
    except SampleFault:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise SampleFault("corrupt_image", f"undecodable video: {type(error).__name__}: {error}") from error
    if not frames:
        raise SampleFault("corrupt_image", "the video has no frames")
    return torch.stack(frames, dim=1)


def is_video_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix[1:].lower() in VIDEO_EXTENSIONS
