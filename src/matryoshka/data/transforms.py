"""Image <-> tensor conversions, resizing and sample grids (numpy + PIL; no torchvision).

Tensors are float (C, H, W) in [-1, 1], the range the diffusion models see; C is 1 (grayscale) or 3 (RGB).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
    """Return `image` as mode "L" (channels=1) or "RGB" (channels=3).

    EXIF orientation is applied, and transparency is composited onto white (dropping alpha would
    turn transparent areas into whatever colour they happen to store, often black).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: scale to 8 bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize so the shorter side equals `size`, then crop the central `size` x `size` square."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    scale = size / min(width, height)
    # Round the longer side up so the crop never runs past the edge.
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 array (H, W) or (H, W, C) -> float tensor (C, H, W) in [-1, 1]."""
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an array of shape (H, W) or (H, W, C), got {array.shape}")
    # The copy makes the array writable and contiguous (it may be a read-only view of a dataset array).
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    return tensor.float().div_(127.5).sub_(1.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of mode "L" or "RGB" -> float tensor (C, H, W) in [-1, 1] (C = 1 or 3)."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"expected a PIL image of mode 'L' or 'RGB', got {image.mode!r}; see convert_channels")
    return uint8_to_tensor(np.asarray(image, dtype=np.uint8))


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float tensor (..., C, H, W) in [-1, 1] -> uint8 array (..., H, W, C); values outside are clipped."""
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return scaled.movedim(-3, -1).numpy()


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (C, H, W) in [-1, 1], C = 1 or 3 -> PIL image of mode "L" or "RGB" (uint8)."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a tensor of shape (C, H, W) with C in (1, 3), got {tuple(image.shape)}")
    array = tensor_to_uint8(image)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)  # uint8: mode L or RGB


def make_grid(
    images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = -1.0
) -> Image.Image:
    """Tile images (N, C, H, W) in [-1, 1] into one PIL image, `nrow` images per row.

    Cells are separated (and surrounded) by `padding` pixels of `pad_value` (in [-1, 1]; -1 is black).
    The last row is filled with padding when N is not a multiple of `nrow`.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("make_grid needs at least one image")
    if nrow <= 0 or padding < 0:
        raise ValueError(f"nrow must be positive and padding non-negative, got nrow={nrow}, padding={padding}")
    n, c, h, w = images.shape
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    grid = torch.full(
        (c, rows * (h + padding) + padding, columns * (w + padding) + padding), float(pad_value)
    )
    for index in range(n):
        row, column = divmod(index, columns)
        top, left = padding + row * (h + padding), padding + column * (w + padding)
        grid[:, top : top + h, left : left + w] = images[index].detach().float().cpu()
    return tensor_to_pil(grid)


def label_rows(grid: Image.Image, labels: list[str], scale: int = 2, margin: int | None = None) -> Image.Image:
    """A grid with one text label left of each of its rows, enlarged `scale` times (nearest neighbour).

    grid: a `make_grid` image whose rows are len(labels) equal bands (padding included); labels: what each
    row shows (its prompt or class). Long labels are cut to fit the margin."""
    from PIL import ImageDraw, ImageFont

    if not labels:
        raise ValueError("label_rows needs at least one label")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    font = ImageFont.load_default()
    margin = margin if margin is not None else min(200, 8 + 6 * max(len(label) for label in labels))
    width, height = grid.width * scale, grid.height * scale
    out = Image.new("RGB", (margin + width, height), (0, 0, 0))
    out.paste(grid.convert("RGB").resize((width, height), Image.Resampling.NEAREST), (margin, 0))
    draw = ImageDraw.Draw(out)
    band = height / len(labels)
    for row, label in enumerate(labels):
        text = label
        while text and draw.textlength(text, font=font) > margin - 8:
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text((4, int(row * band + band / 2)), text, fill=(255, 255, 255), font=font, anchor="lm")
    return out
