"""Training batches: the configured dataset, a resumable distributed order, and the data position.

The order of a map-style dataset (Fashion-MNIST, image folders) is one permutation per epoch, drawn
from (seed, epoch) and independent of the number of processes. Micro-step k of an epoch takes the
global batch perm[offset : offset + G] and rank r reads its contiguous share of it, so the same
images are trained on at every step whether one process or eight run it. torch's DistributedSampler
deals indices round-robin over the whole epoch and cannot start mid-epoch, so neither holds there.

The position (epoch, offset) is saved in checkpoints; a resumed run continues from the next batch.
Tar shards (an IterableDataset read in order per rank) resume by skipping the batches this rank had
already consumed in the epoch (they are read and decoded again, then dropped).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from matryoshka.data import FashionMNIST, FaultCounter, ImageFolderDataset, ShardDataset
from matryoshka.training.config import DataConfig
from matryoshka.typed_config import ConfigError


@dataclass
class DataPosition:
    epoch: int = 0
    # Map-style: samples of this epoch consumed by all ranks together. Shards: by this rank.
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(int(data["epoch"]), int(data["offset"]))


class _Subset(Dataset):
    """The first `limit` items of a map-style dataset."""

    def __init__(self, dataset: Dataset, limit: int) -> None:
        self.dataset, self.limit = dataset, min(limit, len(dataset))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class LabelledFolders(Dataset):
    """An ImageNet-style tree, root/<class>/.../image, with label = index of <class> in sorted order.

    One ImageFolderDataset per class folder, so a bad image is replaced (by the data layer) with another
    image of the same class and labels stay right.
    """

    def __init__(self, root: str, image_size: int, channels: int, captions: bool, faults: FaultCounter) -> None:
        from pathlib import Path

        folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        if not folders:
            raise ConfigError("data.labels", f"is true but {root} has no class subfolders (root/<class>/<images>)")
        self.class_names = [p.name for p in folders]
        self.parts = [ImageFolderDataset(p, image_size, channels, captions, faults) for p in folders]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        label = bisect.bisect_right(self.starts, index) - 1
        item = self.parts[label][index - self.starts[label]]
        return {**item, "label": label}


def build_dataset(
    config: DataConfig, image_size: int, channels: int, rank: int, world_size: int, seed: int, faults: FaultCounter,
    num_frames: int = 0,
) -> Dataset | IterableDataset:
    """The dataset a DataConfig names; items are {"image": (C, S, S) in [-1, 1], "label", "caption"}, or
    for the video kinds {"video": (C, num_frames, S, S), ...}."""
    if config.dataset in ("moving_fashion_mnist", "video_folder", "video_shards"):
        return _video_dataset(config, image_size, channels, rank, world_size, seed, faults, num_frames)
    if config.dataset == "fashion_mnist":
        dataset: Dataset = FashionMNIST(
            config.split, image_size=image_size, channels=channels, root=config.path, fit=config.fit,
            caption_seed=seed,
        )
    elif config.dataset == "folder" and config.labels:
        dataset = LabelledFolders(str(config.path), image_size, channels, config.captions, faults)
    elif config.dataset == "folder":
        dataset = ImageFolderDataset(
            str(config.path), image_size=image_size, channels=channels, captions=config.captions, faults=faults
        )
    else:
        return ShardDataset(
            config.path,  # type: ignore[arg-type]
            image_size=image_size, channels=channels, shuffle_buffer=config.shuffle_buffer, seed=seed,
            rank=rank, world_size=world_size, shuffle=config.shuffle, repeat=False, faults=faults,
        )
    if config.limit is not None:
        dataset = _Subset(dataset, config.limit)
    return dataset


def _video_dataset(
    config: DataConfig, image_size: int, channels: int, rank: int, world_size: int, seed: int, faults: FaultCounter,
    num_frames: int,
) -> Dataset | IterableDataset:
    from matryoshka.video import MovingFashionMNIST, VideoFolderDataset, VideoShardDataset

    if num_frames < 1:
        raise ValueError(f"dataset {config.dataset!r} needs the model's num_frames (got {num_frames})")
    if config.dataset == "video_shards":
        return VideoShardDataset(
            config.path,  # type: ignore[arg-type]
            num_frames, image_size, channels, config.stride, random_start=config.shuffle,
            shuffle_buffer=config.shuffle_buffer, seed=seed, rank=rank, world_size=world_size,
            shuffle=config.shuffle, repeat=False, faults=faults,
        )
    if config.dataset == "video_folder":
        dataset: Dataset = VideoFolderDataset(
            str(config.path), num_frames, image_size, channels, config.stride, random_start=config.shuffle,
            seed=seed, captions=config.captions, faults=faults,
        )
    else:
        dataset = MovingFashionMNIST(
            config.split, num_frames=num_frames, image_size=image_size, channels=channels, caption_seed=seed,
            root=config.path,
        )
    return _Subset(dataset, config.limit) if config.limit is not None else dataset


def epoch_order(size: int, epoch: int, seed: int, shuffle: bool) -> torch.Tensor:
    """The permutation of one epoch; the same on every rank and for any number of ranks."""
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


class GlobalBatchSampler:
    """Index lists of rank `rank` for the rest of one epoch, starting at global sample `offset`.

    Each global batch of `global_batch` consecutive positions of the epoch's permutation is split
    into `world_size` contiguous shares; the last incomplete global batch is dropped.
    """

    def __init__(
        self, size: int, global_batch: int, rank: int, world_size: int, epoch: int, offset: int, seed: int,
        shuffle: bool,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} must be divisible by the {world_size} processes")
        self.order = epoch_order(size, epoch, seed, shuffle)
        self.global_batch, self.local = global_batch, global_batch // world_size
        self.rank, self.offset = rank, offset

    def __iter__(self) -> Iterator[list[int]]:
        start = self.offset
        while start + self.global_batch <= len(self.order):
            first = start + self.rank * self.local
            yield self.order[first : first + self.local].tolist()
            start += self.global_batch

    def __len__(self) -> int:
        return max(0, (len(self.order) - self.offset) // self.global_batch)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """-> {"image": (B, C, S, S), or clips (B, C, T, S, S) from video datasets, "label": (B,), "caption"}."""
    return {
        "image": torch.stack([item["video"] if "video" in item else item["image"] for item in items]),
        "label": torch.tensor([int(item["label"]) for item in items], dtype=torch.long),
        "caption": [item["caption"] for item in items],
    }


class BatchStream:
    """Endless batches of this rank's share of each global batch, tracking the data position.

    next(global_batch) -> {"image": (b, C, S, S), "label": (b,) long (-1 = none), "caption": list[str]}
    with b = global_batch / world_size. The global batch may change between calls (a new stage).
    """

    def __init__(
        self,
        dataset: Dataset | IterableDataset,
        config: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        position: DataPosition | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset, self.config = dataset, config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.position = position or DataPosition()
        self.pin_memory = pin_memory
        self.streaming = isinstance(dataset, IterableDataset)
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._batch = 0
        self._skip = 0  # shards: batches to drop after resuming mid-epoch
        if self.streaming and self.position.offset:
            self._skip = -1  # computed on the first call, when the batch size is known

    def _loader(self, global_batch: int) -> DataLoader:
        # An explicit generator: worker seeds must not draw from (and shift) the global torch RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.position.epoch * 31 + self.rank)
        common = dict(
            num_workers=self.config.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
            generator=generator,
        )
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.position.epoch)
        if self.streaming:
            return DataLoader(self.dataset, batch_size=global_batch // self.world_size, drop_last=True, **common)
        size = len(self.dataset)  # type: ignore[arg-type]
        if size < global_batch:
            raise ConfigError(
                "data.batch_size",
                f"a global batch of {global_batch} is more than the {size} items of the dataset: lower it or use "
                "more data",
            )
        sampler = GlobalBatchSampler(
            size, global_batch, self.rank, self.world_size, self.position.epoch, self.position.offset,
            self.seed, self.config.shuffle,
        )
        return DataLoader(self.dataset, batch_sampler=sampler, **common)

    def next(self, global_batch: int) -> dict[str, Any]:
        if global_batch % self.world_size:
            raise ConfigError(
                "data.batch_size",
                f"the global batch {global_batch} must be divisible by the number of processes {self.world_size}",
            )
        if self._iterator is None or global_batch != self._batch:
            self._batch = global_batch
            self._iterator = iter(self._loader(global_batch))
            if self._skip == -1:
                self._skip = self.position.offset // (global_batch // self.world_size)
        while True:
            batch = next(self._iterator, None)
            if batch is None:  # epoch finished
                self.position = DataPosition(self.position.epoch + 1, 0)
                self._iterator = iter(self._loader(global_batch))
                batch = next(self._iterator, None)
                if batch is None:
                    raise RuntimeError(f"rank {self.rank} got no batch from a whole epoch of {self.config.dataset}")
            if self._skip > 0:
                self._skip -= 1
                continue
            break
        self.position = DataPosition(
            self.position.epoch,
            self.position.offset + (global_batch if not self.streaming else global_batch // self.world_size),
        )
        return batch


__all__ = [
    "BatchStream", "DataPosition", "GlobalBatchSampler", "LabelledFolders", "build_dataset", "collate", "epoch_order",
]
