"""Exponential moving average of a model's weights, with warm-up."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps `module` (a separate copy of the network, same structure) as the EMA of a live model.

    After n updates the decay is min(decay, (1 + n) / (10 + n)) when `warmup` is on, so early on the
    average follows the fast-moving weights instead of remembering the random initialisation.
    Buffers are copied, not averaged. Works on sharded (FSDP2) modules too: both models must be
    sharded alike, and the update then only touches local shards.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = module.eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # (live model, EMA and live parameters, buffer owners) from the last update: walking both
        # module trees for their parameters at every step is measurable Python overhead on a CPU.
        self._pairs: tuple | None = None

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * live, for every parameter of `model` (same order)."""
        weight = 1.0 - self.current_decay()
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, *self._collect(model))
        _, averaged, live, buffers = self._pairs
        sources = [p.detach() for p in live]  # per update: a `param.data = ...` since then is seen
        if all(type(t) in (torch.Tensor, nn.Parameter) for t in averaged) and all(
            a.dtype == s.dtype for a, s in zip(averaged, sources, strict=True)
        ):
            torch._foreach_lerp_(averaged, sources, weight)  # one fused kernel per dtype/device group
        else:  # sharded (DTensor) parameters or mixed dtypes: one at a time
            for target, source in zip(averaged, sources, strict=True):
                target.lerp_(source.to(target.dtype), weight)
        for ema_owner, live_owner, name in buffers:  # looked up each time: `.to()` replaces buffers
            getattr(ema_owner, name).copy_(getattr(live_owner, name))
        self.num_updates += 1

    def _collect(self, model: nn.Module) -> tuple[list, list, list]:
        averaged = list(self.module.parameters())
        live = list(model.parameters())
        if len(averaged) != len(live):
            raise ValueError(f"EMA holds {len(averaged)} parameters but the model has {len(live)}")
        # Frozen parameters (a LoRA run's base weights) never move: their average is their value.
        pairs = [(a, s) for a, s in zip(averaged, live, strict=True) if s.requires_grad]
        averaged, live = [a for a, _ in pairs], [s for _, s in pairs]
        ema_owners = [(m, n) for m in self.module.modules() for n, _ in m.named_buffers(recurse=False)]
        live_owners = [(m, n) for m in model.modules() for n, _ in m.named_buffers(recurse=False)]
        buffers = [(e, m, n) for (e, n), (m, _) in zip(ema_owners, live_owners, strict=True)]
        return averaged, live, buffers
