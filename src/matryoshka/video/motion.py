"""Measuring motion direction in clips: a small learned classifier and a centroid tracker.

Used to check that generated clips move the way their captions say: train `MotionClassifier` on real
MovingFashionMNIST clips, then classify samples. `centroid_motion` is a training-free cross-check: the
brightness-weighted centre of mass of each frame, fitted by a line over time.
Clips are (N, C, T, H, W) floats in [-1, 1] (black background = -1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from matryoshka.atomic import atomic_write_text
from matryoshka.model_dir import save_state_dict

from .moving_fashion_mnist import DIRECTIONS

STILL = len(DIRECTIONS)  # the classifier's extra class: no motion
MOTION_CLASSES: tuple[str, ...] = (*DIRECTIONS, "still")
_WEIGHTS = "motion_classifier.safetensors"
_CONFIG = "motion_classifier.json"


class MotionClassifier(nn.Module):
    """(N, C, T, H, W) -> logits (N, 5) over MOTION_CLASSES (the 4 DIRECTIONS, then "still"); a 3D CNN
    with global pooling.

    Global pooling over space and time makes it blind to where the item is and sensitive to how it
    moves; the input also gets the frame differences as extra channels, which carry the motion. The
    "still" class keeps a clip without motion from being counted as some direction by default.
    """

    def __init__(self, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.in_channels, self.width = in_channels, width
        c = 2 * in_channels

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU())

        self.features = nn.Sequential(
            block(c, width), nn.AvgPool3d((1, 2, 2)),
            block(width, 2 * width), nn.AvgPool3d((1, 2, 2)),
            block(2 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, len(MOTION_CLASSES))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5 or clips.shape[1] != self.in_channels or clips.shape[2] < 2:
            raise ValueError(
                f"expected clips (N, {self.in_channels}, T >= 2, H, W), got {tuple(clips.shape)}"
            )
        diffs = torch.cat([clips[:, :, 1:] - clips[:, :, :-1], torch.zeros_like(clips[:, :, :1])], dim=2)
        h = self.features(torch.cat([clips, diffs], dim=1))
        return self.head(h.mean(dim=(2, 3, 4)))


def train_motion_classifier(
    dataset: Dataset,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    in_channels: int = 1,
    width: int = 16,
    noise_std: float = 0.1,
    still_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> MotionClassifier:
    """Train on a dataset yielding {"video", "direction"} (e.g. MovingFashionMNIST) for `steps` batches.

    A `still_fraction` of every batch is turned into still clips (one frame of the clip repeated, label
    STILL). Gaussian noise of `noise_std` on the inputs keeps it from relying on perfectly clean pixels,
    which generated clips never have.
    """
    torch.manual_seed(seed)
    model = MotionClassifier(in_channels, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    step = 0
    model.train()
    while step < steps:
        for batch in loader:
            clips, labels = batch["video"].clone(), batch["direction"].clone()
            still = torch.rand(len(clips), generator=generator) < still_fraction
            frame = torch.randint(0, clips.shape[2], (len(clips),), generator=generator)
            for i in still.nonzero().flatten().tolist():
                clips[i] = clips[i, :, frame[i] : frame[i] + 1].expand_as(clips[i])
            labels[still] = STILL
            clips = clips + noise_std * torch.randn(clips.shape, generator=generator)
            loss = F.cross_entropy(model(clips), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress and step % 50 == 0:
                print(f"motion classifier step {step}/{steps}: loss {loss.item():.4f}", flush=True)
            if step >= steps:
                break
    return model.eval()


@torch.no_grad()
def predict_directions(model: MotionClassifier, clips: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, C, T, H, W) -> predicted classes (N,): a direction index, or STILL."""
    model.eval()
    out = [model(clips[i : i + batch_size]).argmax(dim=1) for i in range(0, len(clips), batch_size)]
    return torch.cat(out)


def save_motion_classifier(model: MotionClassifier, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), directory / _WEIGHTS)
    atomic_write_text(directory / _CONFIG, json.dumps({"in_channels": model.in_channels, "width": model.width}))
    return directory


def load_motion_classifier(directory: str | Path) -> MotionClassifier:
    directory = Path(directory)
    for name in (_WEIGHTS, _CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not a motion classifier directory")
    config = json.loads((directory / _CONFIG).read_text())
    model = MotionClassifier(int(config["in_channels"]), int(config["width"]))
    model.load_state_dict(load_file(directory / _WEIGHTS))
    return model.eval()


def centroid_track(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> the brightness-weighted centre (x, y) of every frame, (N, T, 2), in pixels."""
    weights = (clips.float().mean(dim=1) + 1).clamp(min=0)  # (N, T, H, W); background -1 weighs 0
    n, t, h, w = weights.shape
    total = weights.sum(dim=(2, 3)).clamp(min=1e-6)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    cx = (weights.sum(dim=2) * xs).sum(dim=2) / total
    cy = (weights.sum(dim=3) * ys).sum(dim=2) / total
    return torch.stack([cx, cy], dim=2)


def centroid_motion(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> velocity (vx, vy) in pixels per frame, (N, 2): a least-squares line per axis."""
    track = centroid_track(clips)
    t = torch.arange(track.shape[1], dtype=torch.float32)
    t = t - t.mean()
    return (track * t[None, :, None]).sum(dim=1) / (t.square().sum().clamp(min=1e-6))


def velocity_along(velocity: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Component of velocities (N, 2) along the given directions (N,) (pixels per frame, + = as asked)."""
    units = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    return (velocity * units[directions]).sum(dim=1)


def centroid_directions(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> the direction (N,) the centroid moves most along."""
    velocity = centroid_motion(clips)
    scores = torch.stack([velocity_along(velocity, torch.full((len(velocity),), d)) for d in range(len(DIRECTIONS))], 1)
    return scores.argmax(dim=1)
