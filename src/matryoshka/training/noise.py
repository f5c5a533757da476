"""Per-sample random draws of a training step, keyed by the sample's global index.

Sample n of the run (counting every sample of every global batch since step 0) always gets the same
time step, the same conditioning-dropout coin and the same noise, whichever rank trains it and
however many ranks there are. This makes a distributed run equal to a single-process run on the
same global batch, and a resumed run equal to an uninterrupted one, without saving any generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio): spreads run seeds apart


def sample_seed(run_seed: int, sample_index: int) -> int:
    return (run_seed * _MIX + sample_index) % (2**63 - 1)


@dataclass
class Draws:
    t: torch.Tensor  # (B,) int64 training times in [0, T)
    drop: torch.Tensor  # (B,) bool on the CPU: replace this sample's conditioning by the null one
    noise: list[torch.Tensor]  # one (B, *shape_r) standard normal tensor per level


def draw(
    sample_indices: list[int],
    level_shapes: list[tuple[int, ...]],
    num_train_steps: int,
    drop_probability: float,
    run_seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Draws:
    """t, dropout coins and per-level noise for the given global sample indices (one row each)."""
    cpu = torch.Generator()
    on_device = torch.Generator(device=device) if device.type != "cpu" else cpu
    times, coins = [], []
    noise: list[list[torch.Tensor]] = [[] for _ in level_shapes]
    for index in sample_indices:
        seed = sample_seed(run_seed, index)
        cpu.manual_seed(seed)
        times.append(torch.randint(0, num_train_steps, (1,), generator=cpu))
        coins.append(torch.rand(1, generator=cpu))
        if on_device is not cpu:
            on_device.manual_seed(seed)
        for level, shape in enumerate(level_shapes):
            noise[level].append(torch.randn(shape, generator=on_device, device=device, dtype=dtype))
    # drop stays on the host (the conditioner reads it there); t goes over without waiting for the device.
    return Draws(
        t=torch.cat(times).to(device, non_blocking=True),
        drop=torch.cat(coins) < drop_probability,
        noise=[torch.stack(level) for level in noise],
    )


__all__ = ["Draws", "draw", "sample_seed"]
