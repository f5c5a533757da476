"""Tiny training configs for tests, examples and benchmarks (seconds per run on a CPU)."""

from __future__ import annotations

import copy
from typing import Any

from matryoshka.training.config import TrainConfig, apply_overrides
from matryoshka.typed_config import from_dict

_TINY: dict[str, Any] = {
    "mdm": {
        "model": {
            "image_size": 16,
            "in_channels": 1,
            "num_classes": 10,
            "levels": [
                {"channels": [8, 8], "num_res_blocks": [1, 1], "norm_groups": 4, "temb_dim": 32},
                {
                    "channels": [8, 16], "num_res_blocks": [1, 1], "attention_layers": [0, 1], "num_heads": 2,
                    "norm_groups": 4, "temb_dim": 32,
                },
            ],
        },
        "diffusion": {},
    },
    "data": {
        "dataset": "fashion_mnist", "split": "test", "fit": "resize", "batch_size": 8, "limit": 64,
        "cond_dropout": 0.25,
    },
    "optim": {"lr": 1e-3, "warmup_steps": 1, "precision": "fp32"},  # "auto" would depend on the machine
    "stages": [{"levels": 1, "steps": 2}, {"levels": 2, "steps": 2}],
    "ema": {"decay": 0.9},
    "checkpoint": {"every": 0, "keep_last": 10},
    "logging": {"every": 1, "sample_count": 2, "sample_steps": 2, "tensorboard": False, "progress": False},
    "seed": 0,
}


def tiny_config_dict(overrides: list[str] | None = None) -> dict[str, Any]:
    """A 16-over-8 px class-conditional Fashion-MNIST run of 2 + 2 steps, as a raw dict."""
    return apply_overrides(copy.deepcopy(_TINY), overrides or [])


def tiny_config(overrides: list[str] | None = None) -> TrainConfig:
    """`tiny_config_dict` validated into a TrainConfig; overrides are `key.path=value` strings."""
    return from_dict(TrainConfig, tiny_config_dict(overrides))


__all__ = ["tiny_config", "tiny_config_dict"]
