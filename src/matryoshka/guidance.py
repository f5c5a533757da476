"""Guidance over a pyramid: classifier-free guidance, its interval, guidance rescale and autoguidance.

A guided denoiser is a callable `denoiser(pyramid, t_model) -> predictions` wrapped around the network,
so every sampler takes it unchanged (REFERENCE.md sections 4 and 4b). Per level r, with c the
conditional prediction and b the base it is pushed away from:

    pred_r = b_r + w_r (c_r - b_r)        while level r's noise level lies in its interval, else c_r
    b = the unconditional rows (the negative prompt / null label) of the same network    (classifier-free)
    b = the conditional prediction of a weaker model of the same levels                   (autoguidance)
    rescale phi: pred_r <- phi * pred_r * std(c_r) / std(pred_r) + (1 - phi) * pred_r     (per sample)

Outside every level's interval only the conditional rows are computed (no second branch, no guide
model), so a step there costs one row per sample instead of two. `GuidedDenoiser.rows` counts the
rows the network was run on, `guide_rows` those of the guide model (network evaluations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from matryoshka.diffusion import PyramidSchedule

Unit = Literal["sigma", "logsnr", "t"]
UNITS: tuple[str, ...] = ("sigma", "logsnr", "t")


@dataclass(frozen=True)
class GuidanceInterval:
    """Guide only while the noise level is in [low, high].

    unit: "sigma" (sqrt((1 - g) / g) of the level's own shifted schedule, EDM2's convention), "logsnr"
    (log(g / (1 - g)) of the level), or "t" (the sampler's time index in [0, T], the same for every level).
    """

    low: float
    high: float
    unit: Unit = "sigma"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"guidance interval unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if math.isnan(self.low) or math.isnan(self.high) or self.low > self.high:
            raise ValueError(f"guidance interval needs low <= high, got [{self.low}, {self.high}]")

    def contains(self, gamma: float, t: float) -> bool:
        """Whether a level at alpha-bar `gamma` (sampler time `t`) is guided."""
        if self.unit == "t":
            value = t
        elif gamma >= 1:
            value = 0.0 if self.unit == "sigma" else math.inf
        elif gamma <= 0:
            value = math.inf if self.unit == "sigma" else -math.inf
        elif self.unit == "sigma":
            value = math.sqrt((1 - gamma) / gamma)
        else:
            value = math.log(gamma) - math.log1p(-gamma)
        return self.low <= value <= self.high


Intervals = GuidanceInterval | Sequence[GuidanceInterval | None] | None


class GuidedDenoiser:
    """`model(pyramid, t, **conditioning)` guided per level (see the module docstring).

    conditional / unconditional: the model's keyword arguments (text_states, text_mask, labels, micros) for
    the B conditional rows and the B unconditional (negative) rows; `unconditional` is unused under
    autoguidance. guidance_scale: w, one float or one per level (highest first); 1 everywhere = the
    conditional prediction alone. schedule: needed for an interval in sigma or log-SNR units.
    guide_model: autoguidance's weaker model (same levels, conditioning and prediction kind).
    """

    def __init__(
        self,
        model: Callable[..., list[torch.Tensor]],
        conditional: dict,
        unconditional: dict | None,
        guidance_scale: float | Sequence[float],
        *,
        interval: Intervals = None,
        schedule: PyramidSchedule | None = None,
        rescale: float = 0.0,
        guide_model: Callable[..., list[torch.Tensor]] | None = None,
    ) -> None:
        self.model, self.guide_model = model, guide_model
        self.conditional, self.unconditional = conditional, unconditional or {}
        self.scales = guidance_scale
        self.intervals = interval
        self.schedule = schedule
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale}")
        self.rescale = rescale
        listed = [interval] if interval is None or isinstance(interval, GuidanceInterval) else list(interval)
        if schedule is None and any(i is not None and i.unit != "t" for i in listed):
            raise ValueError("a guidance interval in sigma or log-SNR needs the schedule (schedule=...)")
        self.rows = 0  # network evaluations, in sample rows
        self.guide_rows = 0  # guide-model evaluations, in sample rows

    def _interval_list(self, levels: int) -> list[GuidanceInterval | None]:
        if self.intervals is None or isinstance(self.intervals, GuidanceInterval):
            return [self.intervals] * levels
        return list(self.intervals)

    def scale_of(self, level: int) -> float:
        return float(self.scales) if isinstance(self.scales, int | float) else float(self.scales[level])

    def guided_levels(self, num_levels: int, t_model: torch.Tensor) -> list[bool]:
        """Which levels are guided at this call (t_model: the network's time, state time - 1)."""
        intervals = self._interval_list(num_levels)
        if len(intervals) != num_levels:
            raise ValueError(f"{len(intervals)} guidance intervals for a {num_levels}-level model")
        if all(interval is None for interval in intervals):
            return [self.scale_of(r) != 1 for r in range(num_levels)]
        t = float(t_model.reshape(-1)[0]) + 1
        gammas = self.schedule.gammas_at(t) if self.schedule is not None else [0.0] * num_levels
        return [
            self.scale_of(r) != 1 and (intervals[r] is None or intervals[r].contains(gammas[r], t))
            for r in range(num_levels)
        ]

    def __call__(self, pyramid: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        guided = self.guided_levels(len(pyramid), t)
        rows = pyramid[-1].shape[0]
        if not any(guided):
            self.rows += rows
            return self.model(pyramid, t, **self.conditional)
        if self.guide_model is not None:
            cond = self.model(pyramid, t, **self.conditional)
            base = self.guide_model(pyramid, t, **self.conditional)
            self.rows += rows
            self.guide_rows += rows
        else:
            batched = {key: _cat_branch(self.unconditional.get(key), self.conditional.get(key))
                       for key in self.conditional}
            outputs = self.model([torch.cat([x, x]) for x in pyramid], torch.cat([t, t]), **batched)
            self.rows += 2 * rows
            base, cond = zip(*(out.chunk(2) for out in outputs), strict=True)
        return [
            self._combine(b, c, self.scale_of(r)) if guided[r] else c
            for r, (b, c) in enumerate(zip(base, cond, strict=True))
        ]

    def _combine(self, base: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        prediction = base + scale * (cond - base)
        if self.rescale > 0:
            dims = tuple(range(1, cond.ndim))
            ratio = cond.std(dim=dims, keepdim=True) / prediction.std(dim=dims, keepdim=True).clamp(min=1e-12)
            prediction = self.rescale * prediction * ratio + (1 - self.rescale) * prediction
        return prediction


def classifier_free_guidance(
    model: Callable[..., list[torch.Tensor]],
    conditional: dict,
    unconditional: dict,
    guidance_scale: float | Sequence[float],
    **options,
) -> GuidedDenoiser:
    """Wrap `model(pyramid, t, **conditioning)` into a guided denoiser: both branches run as one batch of
    2B rows, unconditional first; prediction = u + w (c - u), per level when w is a list; a scale of 1
    everywhere runs the conditional branch alone. options: interval, schedule, rescale, guide_model
    (`GuidedDenoiser`)."""
    return GuidedDenoiser(model, conditional, unconditional, guidance_scale, **options)


def _cat_branch(uncond, cond):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
    if uncond is None:
        raise ValueError("the unconditional branch is missing a conditioning input that the conditional has")
    # Text states (B, S, D) and masks (B, S) of the two branches may differ in length S: pad.
    if cond.ndim in (2, 3) and uncond.shape[1] != cond.shape[1]:
        length = max(uncond.shape[1], cond.shape[1])
        uncond, cond = _pad_tokens(uncond, length), _pad_tokens(cond, length)
    return torch.cat([uncond, cond])


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


def parse_intervals(text: str, unit: str, num_levels: int) -> GuidanceInterval | list[GuidanceInterval | None]:
    """'LO,HI' (every level) or 'LO,HI;LO,HI;...' (one per level, highest first; 'always' = guided at
    every step)."""
    parts = [part.strip() for part in text.split(";")]
    if len(parts) not in (1, num_levels):
        raise ValueError(f"give one interval or one per level ({num_levels}), got {len(parts)}")

    def one(part: str) -> GuidanceInterval | None:
        if part == "always":
            return None
        pieces = part.split(",")
        if len(pieces) != 2:
            raise ValueError(f"an interval is LO,HI, got {part!r}")
        return GuidanceInterval(float(pieces[0]), float(pieces[1]), unit)  # type: ignore[arg-type]

    intervals = [one(part) for part in parts]
    return intervals[0] if len(intervals) == 1 and intervals[0] is not None else intervals


__all__ = ["UNITS", "GuidanceInterval", "GuidedDenoiser", "classifier_free_guidance", "parse_intervals"]
