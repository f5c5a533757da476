"""Turn raw bytes (image files, caption text) into clean values, or raise a `SampleFault`.

Shared by the folder and shard loaders so that both classify faults the same way.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import torch
from PIL import Image

from .faults import FaultCounter, SampleFault
from .transforms import convert_channels, pil_to_tensor, resize_center_crop

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"}
)
# 64 MiB is far above any sane training image and well below a memory problem.
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CAPTION_CHARS = 512

_WHITESPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_file_bytes(path: str | os.PathLike[str], max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """Read a whole file, mapping absence, size and I/O errors to SampleFault kinds."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise SampleFault("oversize_file", f"{path} has {size} bytes > limit {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError as error:
        raise SampleFault("missing_file", str(path)) from error
    except OSError as error:
        raise SampleFault("unreadable_file", f"{path}: {error}") from error


def decode_image(data: bytes, image_size: int, channels: int) -> torch.Tensor:
    """Encoded image bytes -> float tensor (channels, image_size, image_size) in [-1, 1].

    The shorter side is resized to `image_size` (bicubic), then the centre is cropped.
    Raises SampleFault("truncated_image" | "corrupt_image") for bytes PIL cannot fully decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # JPEG only: decode at the smallest 1/2^k scale still >= the target size (much faster).
            image.draft(None, (image_size, image_size))
            image.load()
            image = convert_channels(image, channels)
            image = resize_center_crop(image, image_size)
    except Image.DecompressionBombError as error:
        raise SampleFault("oversize_file", str(error)) from error
    except EOFError as error:
        raise SampleFault("truncated_image", str(error) or "unexpected end of image data") from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad input
        message = str(error)
        lowered = message.lower()
        kind = "truncated_image" if ("truncat" in lowered or "broken data stream" in lowered) else "corrupt_image"
        raise SampleFault(kind, f"{type(error).__name__}: {message}") from error
    return pil_to_tensor(image)


def decode_caption(raw: bytes | str, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[str, bool]:
    """Caption bytes or text -> (normalised caption, whether it was truncated to `max_chars`).

    Whitespace runs (newlines included) become single spaces, control characters are dropped, and a
    UTF-8 byte-order mark is ignored. Raises SampleFault("caption_not_utf8") for invalid UTF-8.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise SampleFault("caption_not_utf8", str(error)) from error
    else:
        text = raw
    text = _WHITESPACE.sub(" ", _CONTROL.sub("", text)).strip()
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars].rstrip(), True


def clean_caption(
    raw: bytes | str | None, *, max_chars: int, required: bool, faults: FaultCounter | None
) -> str:
    """Decode a caption for one sample, counting notes; raise SampleFault when the sample must go.

    `raw=None` means there was no caption at all. An empty or missing caption is a failure when
    `required`, otherwise it is kept as "" (an empty-but-present caption is noted). Notes go to `faults`
    unless it is None.
    """
    if raw is None:
        if required:
            raise SampleFault("missing_caption")
        return ""
    text, truncated = decode_caption(raw, max_chars)
    if not text:
        if required:
            raise SampleFault("empty_caption")
        if faults is not None:
            faults.record_note("empty_caption_kept")
    if truncated and faults is not None:
        faults.record_note("caption_truncated")
    return text
