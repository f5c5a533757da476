"""Writing videos: GIF (PIL) and MP4 (PyAV), one clip, a grid of clips, or every pyramid level.

Tensors are float (C, T, H, W) in [-1, 1] with C = 1 or 3, as the datasets yield and the models produce.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from matryoshka.data import tensor_to_uint8

from .decoding import require_av

VIDEO_FORMATS: tuple[str, ...] = (".gif", ".mp4")
# Tried in order; the first this PyAV build can encode wins (libx264 is missing from some builds).
MP4_CODECS: tuple[str, ...] = ("libx264", "h264", "mpeg4")


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 4 or video.shape[0] not in (1, 3) or video.shape[1] < 1:
        raise ValueError(f"expected a video tensor (C, T, H, W) with C in (1, 3) and T >= 1, got {tuple(video.shape)}")


def video_to_frames(video: torch.Tensor, upscale: int = 1) -> list[Image.Image]:
    """(C, T, H, W) in [-1, 1] -> T PIL images (mode L or RGB), optionally enlarged `upscale` x (nearest)."""
    _check_video(video)
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    frames = tensor_to_uint8(video.transpose(0, 1))  # (T, H, W, C)
    images = [Image.fromarray(f[:, :, 0] if f.shape[2] == 1 else f) for f in frames]
    if upscale > 1:
        images = [im.resize((im.width * upscale, im.height * upscale), Image.NEAREST) for im in images]
    return images


def mp4_codec() -> str:
    """The MP4 video encoder this PyAV build has (libx264 preferred, else mpeg4)."""
    av = require_av()
    for name in MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # unknown or decoder-only codec: try the next one
            continue
        return name
    raise RuntimeError(f"this PyAV/FFmpeg build can encode none of {', '.join(MP4_CODECS)}; cannot write MP4")


def _as_fraction(fps: float) -> Fraction:
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _write_gif(frames: list[Image.Image], path: Path, fps: float) -> None:
    # GIF delays are whole centiseconds. Pillow merges identical consecutive frames into one longer
    # frame, so a still clip reads back with fewer frames but the same duration.
    duration = max(10, round(1000 / fps / 10) * 10)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0, optimize=False)


def _write_mp4(frames: list[Image.Image], path: Path, fps: float, codec: str | None) -> None:
    av = require_av()
    codec = codec or mp4_codec()
    rgb = [np.asarray(f.convert("RGB")) for f in frames]
    height, width = rgb[0].shape[:2]
    # 4:2:0 chroma needs even sides: pad the right/bottom edge by repeating it.
    pad_h, pad_w = height % 2, width % 2
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=_as_fraction(fps))
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "12", "preset": "medium"}
        else:
            stream.bit_rate = max(2_000_000, 8 * width * height * int(math.ceil(fps)))
        for array in rgb:
            if pad_h or pad_w:
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def save_video(
    video: torch.Tensor,
    path: str | os.PathLike[str],
    fps: float = 8.0,
    upscale: int = 1,
    codec: str | None = None,
) -> Path:
    """Write (C, T, H, W) in [-1, 1] to `path`: .gif (PIL) or .mp4 (PyAV). Returns the path.

    upscale enlarges every frame (nearest neighbour), handy for 32x32 samples; codec overrides the MP4
    encoder (default `mp4_codec()`). Parent folders are created.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ValueError(
            f"cannot write {path}: the video format is chosen by the suffix, one of {', '.join(VIDEO_FORMATS)}"
        )
    frames = video_to_frames(video, upscale)
    _as_fraction(fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        _write_gif(frames, path, fps)
    else:
        _write_mp4(frames, path, fps, codec)
    return path


def tile_videos(
    videos: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = -1.0
) -> torch.Tensor:
    """Videos (N, C, T, H, W) -> one video (C, T, H', W') showing them side by side, `nrow` per row."""
    if videos.ndim != 5:
        raise ValueError(f"expected videos (N, C, T, H, W), got {tuple(videos.shape)}")
    n, c, t, h, w = videos.shape
    columns = nrow or max(1, math.ceil(math.sqrt(n)))
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = torch.full((c, t, rows * (h + padding) + padding, columns * (w + padding) + padding), float(pad_value))
    for index in range(n):
        row, column = divmod(index, columns)
        top, left = padding + row * (h + padding), padding + column * (w + padding)
        grid[:, :, top : top + h, left : left + w] = videos[index].detach().float().cpu()
    return grid


def level_video_path(path: str | os.PathLike[str], level: int) -> Path:
    """clip.gif -> clip.level{level}.gif (level 0 = the top of the pyramid)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.level{level}{path.suffix}")


def save_video_levels(
    levels: list[torch.Tensor], path: str | os.PathLike[str], fps: float = 8.0, upscale: int = 1
) -> list[Path]:
    """Write every level of a video pyramid (each (C, T_r, H_r, W_r) or a batch (N, C, T_r, H_r, W_r)).

    Level r goes to `level_video_path(path, r)`, enlarged to the top level's size (nearest) times
    `upscale`, and played at fps x T_r / T_0 so that every level lasts as long as the top one.
    """
    if not levels:
        raise ValueError("save_video_levels needs at least one level")
    top = levels[0].shape[-1]
    top_frames = levels[0].shape[-3]
    written = []
    for r, level in enumerate(levels):
        factor = max(1, top // level.shape[-1])
        # Enlarge before tiling, so that every level's grid has the same layout and padding.
        level = level.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
        video = level if level.ndim == 4 else level[0] if len(level) == 1 else tile_videos(level)
        written.append(save_video(video, level_video_path(path, r), fps * level.shape[-3] / top_frames, upscale))
    return written
