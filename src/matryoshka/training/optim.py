"""AdamW and the learning-rate schedule of a stage (linear warm-up, then constant or cosine)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from matryoshka.training.config import OptimConfig


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig, lr: float, device: torch.device, sharded: bool
) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CUDA and CPU (on the CPU foreach loops over the tensors; BENCHMARKS.md
    compares them) and the foreach one elsewhere and for sharded models."""
    choice = config.implementation
    if choice == "auto":
        choice = "fused" if device.type in ("cuda", "cpu") and not sharded else "foreach"
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[choice]
    return torch.optim.AdamW(
        parameters, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay, **options
    )


def learning_rate(step_in_stage: int, stage_steps: int, base_lr: float, warmup: int, schedule: str,
                  min_ratio: float) -> float:
    """The learning rate of the stage's `step_in_stage`-th optimizer step (0-based)."""
    if warmup > 0 and step_in_stage < warmup:
        return base_lr * (step_in_stage + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(1, stage_steps - warmup)
        progress = min(1.0, (step_in_stage - warmup) / span)
        floor = base_lr * min_ratio
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


__all__ = ["learning_rate", "make_optimizer"]
