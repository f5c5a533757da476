"""Train the evaluation classifier on Fashion-MNIST and save it.

Reads the original IDX files (``*-images-idx3-ubyte.gz`` / ``*-labels-idx1-ubyte.gz``) directly with
numpy, pads the 28x28 images by 2 px to 32x32 (background value), scales them to ``[-1, 1]`` with one
grey channel, trains a ``SmallCNNClassifier`` for a few epochs on the CPU, prints the test accuracy
(overall and per class) and saves the classifier (safetensors + json) plus ``metrics.json``.

    python benchmarks/train_fashion_classifier.py --out runs/fashion-classifier --epochs 3
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from matryoshka.evaluation import (
    ClassifierConfig,
    conditioning_accuracy,
    save_classifier,
    train_classifier,
    write_json_report,
)

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: Path, split: str, pad: int) -> TensorDataset:
    """(N, 1, 28 + 2 pad, same) images in [-1, 1] and (N,) int64 labels of ``train`` or ``t10k``."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))  # zero = the black background
    tensor = torch.from_numpy(padded.astype(np.float32) / 127.5 - 1.0)[:, None]
    return TensorDataset(tensor, torch.from_numpy(labels.astype(np.int64)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the saved classifier")
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv stage")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 leaves cores free)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train = load_split(args.data_dir, "train", pad=2)
    test = load_split(args.data_dir, "t10k", pad=2)
    config = ClassifierConfig(in_channels=1, image_size=32, num_classes=10, width=args.width)
    print(f"train {len(train)} / test {len(test)} images, 1x32x32; {config}")

    start = time.perf_counter()
    model = train_classifier(train, args.epochs, config=config, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_seconds = time.perf_counter() - start
    test_images, test_labels = test.tensors
    overall, per_class = conditioning_accuracy(model, test_images, test_labels)

    print(f"trained {args.epochs} epochs in {train_seconds:.0f} s ({args.threads} thread(s))")
    print(f"test accuracy: {overall:.4f}")
    for label, accuracy in per_class.items():
        print(f"  {label} {FASHION_CLASSES[label]:<12} {accuracy:.3f}")
    save_classifier(model, args.out)
    write_json_report(
        {
            "test_accuracy": overall,
            "per_class_accuracy": {FASHION_CLASSES[k]: v for k, v in per_class.items()},
            "epochs": args.epochs,
            "train_seconds": train_seconds,
            "threads": args.threads,
            "config": config,
        },
        args.out / "metrics.json",
    )
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
