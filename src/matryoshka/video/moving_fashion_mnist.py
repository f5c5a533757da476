"""Moving Fashion-MNIST: one Fashion-MNIST item sliding across a black canvas, with motion captions.

A small, fully generated text-to-video dataset: item `i // 4` of the Fashion-MNIST split moves in
direction `i % 4` (left, right, up, down) at a constant speed, bouncing off the canvas edges when its
path is longer than the room it has. Everything about a clip (start position, caption) is a pure
function of its index and the seeds, so a clip can be regenerated anywhere (DataLoader workers, ranks,
evaluation) without storing it.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from matryoshka.data import CLASS_SYNONYMS, load_arrays, uint8_to_tensor

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per frame in (x, y) pixels; y grows downwards (image rows).
_STEPS: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))

# How a caption names each direction. No phrase may name another direction, nor a Fashion-MNIST class
# (checked in the tests), so `direction_named_in` and `classes_named_in` read captions unambiguously.
DIRECTION_PHRASES: tuple[tuple[str, ...], ...] = (
    ("left", "to the left", "leftwards"),
    ("right", "to the right", "rightwards"),
    ("up", "upwards", "towards the top edge"),
    ("down", "downwards", "towards the bottom edge"),
)
# "{a}": "a sneaker" / "a pair of trainers"; "{n}": "sneaker"; "{d}": a direction phrase.
MOTION_TEMPLATES: tuple[str, ...] = (
    "{a} moving {d}",
    "{a} sliding {d}",
    "{a} drifting {d}",
    "{a} gliding {d}",
    "a video of {a} moving {d}",
    "a clip of {a} travelling {d}",
    "{n} moving {d}",
    "{a} that moves {d}",
    "{a} floating {d} on a black background",
    "{a} passing {d} across the frame",
)

_DIRECTION_MATCHERS: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])"), direction)
    for direction, phrases in enumerate(DIRECTION_PHRASES)
    for phrase in sorted(phrases, key=len, reverse=True)
)


def motion_caption(class_label: int, direction: int, rng: random.Random | None = None) -> str:
    """A caption naming the item's class and its direction, e.g. "a bag sliding to the right"."""
    if not 0 <= class_label < len(CLASS_SYNONYMS):
        raise ValueError(f"class_label must be in [0, {len(CLASS_SYNONYMS) - 1}], got {class_label}")
    if not 0 <= direction < len(DIRECTIONS):
        raise ValueError(f"direction must be in [0, {len(DIRECTIONS) - 1}] ({', '.join(DIRECTIONS)}), got {direction}")
    rng = rng if rng is not None else random.Random()
    noun = rng.choice(CLASS_SYNONYMS[class_label])
    template = rng.choice(MOTION_TEMPLATES)
    return template.format(a=noun.indefinite, n=noun.bare, d=rng.choice(DIRECTION_PHRASES[direction]))


def all_motion_captions(class_label: int, direction: int) -> list[str]:
    """Every distinct caption `motion_caption` can produce for (class_label, direction), sorted."""
    return sorted(
        {
            template.format(a=noun.indefinite, n=noun.bare, d=phrase)
            for template in MOTION_TEMPLATES
            for noun in CLASS_SYNONYMS[class_label]
            for phrase in DIRECTION_PHRASES[direction]
        }
    )


def directions_named_in(caption: str) -> set[int]:
    """The directions (indices into DIRECTIONS) that `caption` names, by whole words, case-insensitive."""
    text = " ".join(caption.lower().split())
    found = set()
    for pattern, direction in _DIRECTION_MATCHERS:
        if pattern.search(text):
            found.add(direction)
            text = pattern.sub(" | ", text)  # "to the left" must not also read as something shorter
    return found


def direction_index(direction: int | str) -> int:
    """0..3 from an index or a name ("left", "right", "up", "down")."""
    if isinstance(direction, str):
        if direction.lower() not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
        return DIRECTIONS.index(direction.lower())
    if not 0 <= int(direction) < len(DIRECTIONS):
        raise ValueError(f"direction must be in [0, {len(DIRECTIONS) - 1}], got {direction}")
    return int(direction)


def _bounce(position: np.ndarray, room: int) -> np.ndarray:
    """Fold positions on an unbounded line back into [0, room] (reflection at both edges)."""
    if room == 0:
        return np.zeros_like(position)
    period = 2 * room
    folded = np.mod(position, period)
    return np.where(folded > room, period - folded, folded)


def render_clip(
    item: np.ndarray, canvas: int, num_frames: int, direction: int, speed: int, start: tuple[int, int]
) -> np.ndarray:
    """Paste `item` (h, w) uint8 onto a black (T, canvas, canvas) uint8 clip moving from `start` (x, y).

    The item moves `speed` pixels per frame along DIRECTIONS[direction], reflecting off the edges.
    """
    h, w = item.shape
    room_x, room_y = canvas - w, canvas - h
    if room_x < 0 or room_y < 0:
        raise ValueError(f"an item of {w}x{h} does not fit on a {canvas}x{canvas} canvas")
    dx, dy = _STEPS[direction]
    steps = np.arange(num_frames) * speed
    xs = _bounce(start[0] + dx * steps, room_x)
    ys = _bounce(start[1] + dy * steps, room_y)
    clip = np.zeros((num_frames, canvas, canvas), dtype=np.uint8)
    for t in range(num_frames):
        clip[t, ys[t] : ys[t] + h, xs[t] : xs[t] + w] = item
    return clip


class MovingFashionMNIST(Dataset):
    """Clips `{"video": (C, T, S, S) in [-1, 1], "caption": str, "label": int, "class_label": int, "direction": int}`.

    Index i shows Fashion-MNIST item i // 4 moving in direction i % 4, so every item appears in all four
    directions and any 4 consecutive indices are balanced. label = class_label * 4 + direction.
    The start position along the motion is drawn so that the whole path fits without bouncing when it
    can (then the caption is true for every frame); the position across the motion is uniform.

    Args:
        split: Fashion-MNIST split ("train" or "test").
        num_frames: T.
        image_size: S, the canvas side.
        channels: 1, or 3 (gray repeated).
        item_size: side the 28x28 item is resized to (default: 14 when S <= 32, else S // 2).
        speed: pixels per frame (default: the room left for the item over T - 1 frames, at least 1).
        seed: seeds the start positions.
        caption_seed: captions vary with (caption_seed, epoch, index); None draws fresh randomness.
        length: number of clips (default 4 x the split's size); indices beyond 4 x size wrap the items.
        root, download: where Fashion-MNIST is (see matryoshka.data.load_arrays).
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        num_frames: int = 8,
        image_size: int = 32,
        channels: int = 1,
        item_size: int | None = None,
        speed: int | None = None,
        seed: int = 0,
        caption_seed: int | None = 0,
        length: int | None = None,
        root: str | os.PathLike[str] | None = None,
        download: bool = True,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        item_size = item_size if item_size is not None else (14 if image_size <= 32 else image_size // 2)
        if not 1 <= item_size <= image_size:
            raise ValueError(f"item_size must be in [1, image_size={image_size}], got {item_size}")
        room = image_size - item_size
        if speed is None:
            speed = max(1, room // max(num_frames - 1, 1))
        if speed < 0:
            raise ValueError(f"speed must be >= 0, got {speed}")
        if length is not None and length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.num_frames, self.image_size, self.channels = split, num_frames, image_size, channels
        self.item_size, self.speed, self.seed, self.caption_seed = item_size, speed, seed, caption_seed
        self.images, self.labels = load_arrays(split, root, download)
        self.length = length if length is not None else 4 * len(self.labels)
        self.epoch = 0
        self._items: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        """Vary the captions per epoch (the clips themselves never change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _item(self, item_index: int) -> np.ndarray:
        item = self._items.get(item_index)
        if item is None:
            pixels = self.images[item_index]
            if self.item_size != pixels.shape[0]:
                resized = Image.fromarray(pixels).resize((self.item_size, self.item_size), Image.BICUBIC)
                pixels = np.asarray(resized)
            item = self._items[item_index] = np.ascontiguousarray(pixels)
        return item

    def clip_info(self, index: int) -> dict[str, Any]:
        """What clip `index` shows: item (Fashion-MNIST index), class_label, direction, start (x, y)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        index %= len(self)
        item_index, direction = (index // 4) % len(self.labels), index % 4
        room = self.image_size - self.item_size
        path = self.speed * (self.num_frames - 1)
        rng = random.Random(f"moving-fashion-mnist/{self.seed}/{index}")
        along = rng.randint(0, max(room - path, 0))
        across = rng.randint(0, room)
        # "along" counts from the edge the item starts at: the right edge when it moves left, etc.
        forward = _STEPS[direction][0] + _STEPS[direction][1] > 0
        along = along if forward else room - along
        start = (along, across) if direction < 2 else (across, along)
        return {
            "item": item_index,
            "class_label": int(self.labels[item_index]),
            "direction": direction,
            "start": start,
        }

    def clip(self, index: int) -> np.ndarray:
        """The clip as uint8 (T, S, S)."""
        info = self.clip_info(index)
        return render_clip(
            self._item(info["item"]), self.image_size, self.num_frames, info["direction"], self.speed, info["start"]
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self.clip_info(index)
        index %= len(self)
        frames = self.clip(index)
        video = uint8_to_tensor(frames.transpose(1, 2, 0)).unsqueeze(0)  # (1, T, S, S)
        if self.channels == 3:
            video = video.expand(3, -1, -1, -1).contiguous()
        rng = None if self.caption_seed is None else random.Random(f"{self.caption_seed}/{self.epoch}/{index}")
        caption = motion_caption(info["class_label"], info["direction"], rng)
        return {
            "video": video,
            "caption": caption,
            "label": info["class_label"] * len(DIRECTIONS) + info["direction"],
            "class_label": info["class_label"],
            "direction": info["direction"],
        }
