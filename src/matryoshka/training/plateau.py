"""Automatic progressive stages: a stage ends when its held-out loss stops improving.

The metric is the EMA model's multi-resolution loss on one fixed held-out batch, at fixed times
(evenly spread over [0, T)) and fixed noise, so its changes are the model's alone. It is measured every
`every` steps of the stage; when `patience` measurements in a row fail to beat the best by more than
`min_delta` (relative), the stage ends there (never before `min_steps`, never after the stage's
`steps`, which stays its maximum). The tracker's state goes into every checkpoint, so a resumed run
takes the same decisions as an uninterrupted one.

Held-out data: Fashion-MNIST (and moving Fashion-MNIST) runs measure on the split they do not train on;
image folders on their first `batch_size` images (not held out: a folder has no second split).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from matryoshka.diffusion import PyramidSchedule
from matryoshka.model_dir import MDMConfig
from matryoshka.training.config import DataConfig, PlateauConfig
from matryoshka.typed_config import ConfigError


@dataclass
class PlateauTracker:
    """The running decision of one stage: best value, measurements since it, and the history."""

    config: PlateauConfig
    best: float = math.inf
    stale: int = 0
    history: list[list[float]] = field(default_factory=list)  # [stage step, value]

    def due(self, stage_step: int) -> bool:
        return stage_step > 0 and stage_step % self.config.every == 0

    def update(self, stage_step: int, value: float) -> bool:
        """Record a measurement at `stage_step` (steps into the stage); True when the stage should end."""
        self.history.append([stage_step, value])
        if value < self.best * (1 - self.config.min_delta):
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return self.stale >= self.config.patience and stage_step >= self.config.min_steps

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale, "history": self.history}

    @classmethod
    def from_dict(cls, config: PlateauConfig, state: dict[str, Any] | None) -> PlateauTracker:
        if not state:
            return cls(config)
        return cls(config, float(state["best"]), int(state["stale"]), [list(p) for p in state["history"]])


def held_out_items(data: DataConfig, image_size: int, channels: int, num_frames: int, seed: int, count: int):
    """`count` items (dicts with image/video, label, caption) that the stage's metric is measured on."""
    from matryoshka.training.data import build_dataset

    if data.dataset in ("shards", "video_shards"):
        raise ConfigError("stages.end_on_plateau", f"needs a map-style dataset; {data.dataset!r} has no held-out items")
    if data.dataset in ("fashion_mnist", "moving_fashion_mnist"):
        data = dataclasses.replace(data, split="test" if data.split == "train" else "train", limit=None)
    from matryoshka.data import FaultCounter

    dataset = build_dataset(data, image_size, channels, 0, 1, seed, FaultCounter(1.0, 0), num_frames=num_frames)
    return [dataset[i] for i in range(min(count, len(dataset)))]


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module, items: list[dict], mdm: MDMConfig, final_scales: list[int], schedule: PyramidSchedule,
    conditioner, seed: int, device: torch.device, time_scales: list[int] | None = None,
) -> float:
    """The mean multi-resolution loss of `model` on the items at fixed times and noise (no dropout)."""
    from matryoshka.training.loop import diffusion_loss

    key = "video" if "video" in items[0] else "image"
    images = torch.stack([item[key] for item in items]).to(device)
    count = images.shape[0]
    steps = schedule.num_train_steps
    t = ((torch.arange(count, dtype=torch.float64) + 0.5) * steps / count).long().clamp(max=steps - 1).to(device)
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn((count, *shape), generator=generator).to(device) for shape in mdm.model.level_shapes()]
    labels = torch.tensor([int(item.get("label", -1)) for item in items])
    captions = [str(item.get("caption", "")) for item in items]
    conditioning = conditioner(labels, captions, torch.zeros(count, dtype=torch.bool))
    was_training = model.training
    model.eval()
    try:
        loss = diffusion_loss(model, images, final_scales, t, noise, conditioning, schedule, mdm.diffusion,
                              time_scales=time_scales)
    finally:
        model.train(was_training)
    return float(loss.total.mean())


__all__ = ["PlateauTracker", "held_out_items", "held_out_loss"]
