"""A small CNN classifier for Fashion-MNIST-like images, and conditioning accuracy with it.

Used to check that class- or caption-conditioned samples show the class they were asked for: train
the classifier once on real data (``benchmarks/train_fashion_classifier.py``), then classify samples.
Images are ``(N, C, H, W)`` floats in ``[-1, 1]`` like everywhere else in the project.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from matryoshka.atomic import atomic_write_text
from matryoshka.model_dir import save_state_dict

__all__ = [
    "ClassifierConfig",
    "SmallCNNClassifier",
    "conditioning_accuracy",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

_WEIGHTS_NAME = "classifier.safetensors"
_CONFIG_NAME = "classifier.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a SmallCNNClassifier.

    Args:
        in_channels: 1 (grey) or 3 (RGB).
        image_size: side of the square input; a multiple of 4 (two 2x poolings), e.g. 16 or 32.
        num_classes: number of output classes (>= 2).
        width: channels of the first stage; the later stages have 2x and 4x this.
    """

    in_channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    width: int = 32

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 and >= 8, got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNNClassifier(nn.Module):
    """Three conv stages (width, 2*width at 1/2 size, 4*width at 1/4 size), global average pool, linear.

    ``forward``: images ``(N, C, S, S)`` in ``[-1, 1]`` -> logits ``(N, num_classes)``.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(
            _conv_bn_relu(config.in_channels, w),
            _conv_bn_relu(w, w),
            nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w),
            _conv_bn_relu(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, config.num_classes))

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate ``(N, C, S, S)`` images for this classifier; grey images are repeated for RGB models."""
        c = self.config
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"classifier expects {c.image_size}x{c.image_size} images, got "
                f"{images.shape[-2]}x{images.shape[-1]}: resize them first"
            )
        if images.shape[1] == 1 and c.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != c.in_channels:
            raise ValueError(f"classifier expects {c.in_channels}-channel images, got {images.shape[1]} channels")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.check_images(images)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Most likely class of each image: ``(N, C, S, S)`` -> ``(N,)`` int64 on the CPU (eval mode)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            predictions = [
                self(batch.to(device=device, dtype=torch.float32)).argmax(dim=1).cpu()
                for batch in images.split(batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def save_classifier(model: SmallCNNClassifier, directory: str | Path) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` (its config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_state_dict(state, directory / _WEIGHTS_NAME)
    record = {"format_version": _FORMAT_VERSION, "architecture": "SmallCNNClassifier", **asdict(model.config)}
    atomic_write_text(directory / _CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> SmallCNNClassifier:
    """Load a classifier written by ``save_classifier``, in eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / _CONFIG_NAME, directory / _WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"not a saved classifier: {path} is missing")
    record = json.loads(config_path.read_text())
    if record.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported classifier format {record.get('format_version')!r}")
    fields = {name: record[name] for name in ("in_channels", "image_size", "num_classes", "width")}
    model = SmallCNNClassifier(ClassifierConfig(**fields))
    model.load_state_dict(load_file(str(weights_path)))
    return model.to(device).eval()


def _label_of(item: object) -> int:
    label = item[1]  # type: ignore[index]
    return int(label.item() if isinstance(label, torch.Tensor) else label)


def train_classifier(
    dataset: Dataset,
    epochs: int,
    *,
    config: ClassifierConfig | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SmallCNNClassifier:
    """Train a SmallCNNClassifier with AdamW and a one-cycle learning-rate schedule.

    Args:
        dataset: yields ``(image, label)``, image ``(C, S, S)`` float in ``[-1, 1]``, label an int
            (or 0-d tensor) in ``[0, num_classes)``.
        epochs: passes over the dataset.
        config: the architecture; default: channels and size from the first image, classes from the
            largest label (which costs one pass over the labels), width 32.
    Returns:
        the trained classifier, in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(dataset) < 2:  # type: ignore[arg-type]
        raise ValueError(f"need at least 2 training examples, got {len(dataset)}")  # type: ignore[arg-type]
    first_image = dataset[0][0]
    if config is None:
        if first_image.ndim != 3:
            raise ValueError(f"dataset images must have shape (C, H, W), got {tuple(first_image.shape)}")
        num_classes = max(_label_of(dataset[i]) for i in range(len(dataset))) + 1  # type: ignore[arg-type]
        config = ClassifierConfig(
            in_channels=first_image.shape[0],
            image_size=first_image.shape[-1],
            num_classes=max(num_classes, 2),
        )
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNNClassifier(config).to(device)
    model.check_images(first_image[None])
    # drop the last partial batch: a batch of one breaks BatchNorm, and tiny tails add noise
    drop_last = len(dataset) > batch_size  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    with tqdm(total=epochs * len(loader), disable=not progress, desc="classifier", unit="batch") as bar:
        for epoch in range(epochs):
            for images, labels in loader:
                images = images.to(device=device, dtype=torch.float32)
                labels = torch.as_tensor(labels, device=device).long()
                if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_classes):
                    raise ValueError(
                        f"labels must lie in [0, {config.num_classes}), got {labels.min()}..{labels.max()}"
                    )
                loss = loss_fn(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()


def conditioning_accuracy(
    classifier: SmallCNNClassifier,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    batch_size: int = 256,
) -> tuple[float, dict[int, float]]:
    """How often the classifier sees the requested class in conditioned samples.

    Args:
        images: ``(N, C, S, S)`` in ``[-1, 1]``, sample ``i`` generated for class ``labels[i]``.
        labels: ``(N,)`` requested classes.
    Returns:
        ``(overall accuracy, {class: accuracy over the samples requested for that class})``; classes
        absent from ``labels`` are absent from the dict.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"need one label per image: {images.shape[0]} images, labels of shape {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("no images to evaluate")
    num_classes = classifier.config.num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    correct = classifier.predict(images, batch_size=batch_size) == labels
    per_class = {int(c): float(correct[labels == c].double().mean()) for c in labels.unique()}
    return float(correct.double().mean()), per_class
