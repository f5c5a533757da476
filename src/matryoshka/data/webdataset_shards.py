"""Streaming image-text tar shards in the webdataset layout that img2dataset writes.

Each tar holds samples as consecutive members sharing a key: `000000123.jpg` (image), `000000123.txt`
(caption), `000000123.json` (metadata, unused here). The key is the member path up to the first dot of
its file name; the rest is the extension.

Read with the standard library's `tarfile` rather than the `webdataset` package: every fault (bad image,
bad caption, tar that ends early, missing shard) has to be classified and counted in a `FaultCounter`,
including a tar cut at a member boundary, which a streaming reader cannot tell from a normal end.
"""

from __future__ import annotations

import io
import os
import random
import re
import tarfile
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import IO, Any

from torch.utils.data import IterableDataset, get_worker_info

from .decoding import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_EXTENSIONS,
    clean_caption,
    decode_image,
)
from .faults import FaultCounter, SampleFault

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Image members are looked for in this order when a sample has several.
_IMAGE_PRIORITY = ("jpg", "jpeg", "png", "webp", *sorted(IMAGE_EXTENSIONS - {"jpg", "jpeg", "png", "webp"}))
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: "a/{000..002}.tar" -> a/000.tar, a/001.tar, a/002.tar; "{x,y}" -> x, y.

    Numeric ranges keep the zero padding of their bounds; several (and nested) braces expand in order.
    """
    depth, start = 0, -1
    for i, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                return [head + middle + rest for middle in _expand_body(body) for rest in expand_braces(tail)]
    if depth:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    return [pattern]


def _expand_body(body: str) -> list[str]:
    match = _RANGE.match(body)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.lstrip("-").startswith("0") or len(first) == len(last) else 0
        a, b = int(first), int(last)
        step = 1 if b >= a else -1
        return [f"{n:0{width}d}" for n in range(a, b + step, step)]
    parts, depth, current = [], 0, ""
    for char in body:  # split on top-level commas only
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (char == "{") - (char == "}")
        current += char
    parts.append(current)
    if len(parts) == 1:
        return ["{" + body + "}"]  # not a brace expression (like the shell): keep it literally
    return [item for part in parts for item in expand_braces(part)]


def expand_shard_list(urls_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """A pattern or a list of paths/URLs/patterns -> the flat list of shard locations."""
    items = [urls_or_paths] if isinstance(urls_or_paths, str | os.PathLike) else list(urls_or_paths)
    shards = [shard for item in items for shard in expand_braces(os.fspath(item))]
    if not shards:
        raise ValueError("the shard list is empty")
    return shards


def _split_member_name(name: str) -> tuple[str, str] | None:
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_tar_groups(
    source: str, faults: FaultCounter, max_member_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as raw groups `{"__key__": key, "__shard__": source, ext: bytes}`.

    A shard that cannot be opened is counted (missing_file / unreadable_shard) and yields nothing. A shard
    that ends early is noted (truncated_shard); a sample cut inside one of its members is dropped and
    counted (truncated_sample).
    A member over `max_member_bytes` is not read; its sample is marked `"__oversize__"`.
    """
    with ExitStack() as stack:
        try:
            if source.startswith(("http://", "https://")):
                stream: IO[bytes] = stack.enter_context(urllib.request.urlopen(source, timeout=60))
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
            else:
                path = source.removeprefix("file://")
                tar = stack.enter_context(tarfile.open(path, mode="r:*"))
        except FileNotFoundError:
            faults.record_failure("missing_file")
            return
        except (*_TAR_ERRORS, ValueError):
            faults.record_failure("unreadable_shard")
            return

        group: dict[str, Any] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                split = _split_member_name(member.name)
                if split is None:
                    continue
                key, extension = split
                if group.get("__key__") != key:
                    if group:
                        yield group
                    group = {"__key__": key, "__shard__": source}
                if max_member_bytes is not None and member.size > max_member_bytes:
                    group["__oversize__"] = True
                    continue
                member_file = tar.extractfile(member)
                assert member_file is not None  # regular files always have data
                group[extension] = member_file.read()
            complete = _ends_with_end_marker(tar)
        except _TAR_ERRORS:
            # Cut inside a member (or unreadable compressed data): the sample being read is incomplete.
            faults.record_note("truncated_shard")
            if group:
                faults.record_failure("truncated_sample")
            return
        if not complete:
            # Cut at a member boundary: every member read is whole, so the last sample is still decoded
            # (and dropped later only if it lacks its image or required caption).
            faults.record_note("truncated_shard")
        if group:
            yield group


def _ends_with_end_marker(tar: tarfile.TarFile) -> bool:
    """True when a zero block (the end-of-archive marker) follows the last member (seekable tars only)."""
    fileobj = getattr(tar, "fileobj", None)
    offset = getattr(tar, "offset", None)
    if fileobj is None or offset is None or not getattr(fileobj, "seekable", lambda: False)():
        return True  # a stream cannot be checked; cuts inside members are still detected
    fileobj.seek(offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and block == bytes(tarfile.BLOCKSIZE)


class ShardDataset(IterableDataset):
    """Iterate image-text samples from tar shards as `{"image": (C, S, S) in [-1, 1], "label": -1, "caption": str}`.

    The shard list is shuffled per epoch (same order on every rank, from `seed` and the epoch), then split
    between the `world_size` ranks and, within a rank, the DataLoader workers, so that every shard is read
    by exactly one (rank, worker). Samples are shuffled within a buffer of `shuffle_buffer` raw (undecoded)
    samples. Images are resized (shorter side) and centre-cropped to `image_size`.

    Faults are counted in `faults` and never stop iteration, unless the failure ratio passes its maximum.

    Args:
        urls_or_paths: a list of shard paths/URLs, or a brace pattern like "data/{00000..00009}.tar".
        image_size: S.
        channels: 1 or 3.
        shuffle_buffer: samples held for shuffling (0 or 1: no shuffling within shards).
        seed: base seed for shard order and buffer sampling.
        rank, world_size: this process's place among distributed ranks.
        shuffle: shuffle shards and samples at all (False: shard list order, samples in tar order).
        repeat: loop over epochs forever (the epoch advances by itself) instead of stopping after one.
        require_caption: drop (and count) samples whose caption is missing or empty.
        max_caption_chars: longer captions are truncated (and counted as a note).
        max_member_bytes: larger members are skipped without being read (counted as oversize_file).
        faults: a shared FaultCounter; a default one is made when None.
    """

    def __init__(
        self,
        urls_or_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        image_size: int,
        channels: int = 3,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        repeat: bool = False,
        require_caption: bool = True,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
        max_member_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
        faults: FaultCounter | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.shards = expand_shard_list(urls_or_paths)
        if len(self.shards) < world_size:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {world_size} ranks (each rank needs at least one); "
                "write more, smaller shards"
            )
        self.image_size, self.channels = image_size, channels
        self.shuffle_buffer, self.seed, self.shuffle, self.repeat = shuffle_buffer, seed, shuffle, repeat
        self.rank, self.world_size = rank, world_size
        self.require_caption, self.max_caption_chars = require_caption, max_caption_chars
        self.max_member_bytes = max_member_bytes
        self.faults = faults if faults is not None else FaultCounter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (shard order and buffer sampling); call before each epoch's DataLoader loop.

        DataLoader workers receive a copy of the dataset when iteration starts, so this reaches them unless
        the DataLoader uses persistent_workers=True (then prefer repeat=True).
        """
        self.epoch = int(epoch)

    def shards_for(self, epoch: int, worker_id: int = 0, num_workers: int = 1) -> list[str]:
        """The shards read in `epoch` by one DataLoader worker of this rank."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        consumers = self.world_size * num_workers
        return order[self.rank * num_workers + worker_id :: consumers]

    def _samples(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            yield from iter_tar_groups(shard, self.faults, self.max_member_bytes)

    def _shuffled(self, groups: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from groups
            return
        buffer: list[dict[str, Any]] = []
        for group in groups:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(group)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], group = group, buffer[index]
            yield group
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, group: dict[str, Any]) -> dict[str, Any]:
        """Raw group -> training sample, or raise SampleFault."""
        if group.get("__oversize__"):
            raise SampleFault("oversize_file", group["__key__"])
        extension = next((ext for ext in _IMAGE_PRIORITY if ext in group), None)
        if extension is None:
            raise SampleFault("missing_image", f"{group['__shard__']}: {group['__key__']}")
        image = decode_image(group[extension], self.image_size, self.channels)
        # Caption last: notes (e.g. caption_truncated) are then only counted for samples that are kept.
        caption = clean_caption(
            group.get("txt"), max_chars=self.max_caption_chars, required=self.require_caption, faults=self.faults
        )
        return {"image": image, "label": -1, "caption": caption}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        while True:
            shards = self.shards_for(epoch, worker_id, num_workers)
            if not shards and epoch == self.epoch:
                warnings.warn(
                    f"ShardDataset: rank {self.rank} worker {worker_id} gets no shard "
                    f"({len(self.shards)} shards for {self.world_size} ranks x {num_workers} workers); "
                    "use fewer DataLoader workers or more shards",
                    stacklevel=2,
                )
            rng = random.Random(f"samples/{self.seed}/{epoch}/{self.rank}/{worker_id}")
            for group in self._shuffled(self._samples(shards), rng):
                try:
                    sample = self._decode(group)
                except SampleFault as fault:
                    self.faults.record_failure(fault.kind)
                    continue
                self.faults.record_ok()
                yield sample
            if not self.repeat or not shards:
                return
            epoch += 1


def write_shard(path: str | os.PathLike[str], samples: Sequence[dict[str, bytes]]) -> None:
    """Write samples `{"__key__": key, ext: bytes, ...}` to a tar at `path` in the webdataset layout.

    Small helper for tests, examples and converting folders into shards.
    """
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for extension, data in sample.items():
                if extension.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
