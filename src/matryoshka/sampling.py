"""The one reverse-process loop over a pyramid, and pinning known levels (super-resolution).

All levels are denoised jointly: at every step the network sees the whole noisy pyramid at one time and
each level moves from its own noise level to the next (REFERENCE.md section 4). How a step moves them is
the scheduler's (`matryoshka.schedulers`: DDIM, DDPM, DPM-Solver++(2M), Euler, Heun). The model is any
callable `denoiser(pyramid, t_model) -> predictions`; guidance is a wrapper around such a callable
(`matryoshka.guidance`), so the loop owns no weights and knows no conditioning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from matryoshka import pyramid as pyr
from matryoshka.diffusion import PyramidSchedule
from matryoshka.schedulers import Generators, Scheduler, randn

Denoiser = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
StepCallback = Callable[["StepState"], "list[torch.Tensor] | None"]


@dataclass
class StepState:
    """What a per-step callback sees after step `index` (one network call, from time t to s)."""

    index: int
    t: float
    s: float
    x0: list[torch.Tensor]  # thresholded clean estimates, highest first
    xt: list[torch.Tensor]  # states after the step
    total: int = 0  # network calls of the whole run (Heun makes two per step)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: list[torch.Tensor],
    scheduler: Scheduler,
    *,
    generator: Generators = None,
    callback: StepCallback | None = None,
    progress: bool | dict = False,
    replace_levels: Callable[[list[torch.Tensor], float], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The reverse process: from `noise` (the pyramid at the scheduler's first time) to its last time.

    scheduler: any `matryoshka.schedulers.Scheduler` on which set_timesteps was called. Every network call
    is one step: the denoiser sees the scheduler's view of the state and time t - 1, the scheduler moves
    every level. replace_levels(pyramid, time) may overwrite levels, at the start and after every step
    (`condition_on_levels` pins given low levels); callback(StepState) runs after every step and may
    return a new pyramid to continue from. Returns the final pyramid, each level multiplied back by its
    signal scale and clipped to [-1, 1].
    """
    if not scheduler.times:
        raise ValueError("call scheduler.set_timesteps(...) before sampling")
    x_t = list(noise)
    if len(x_t) != scheduler.schedule.num_levels:
        raise ValueError(
            f"the noise pyramid has {len(x_t)} levels but the schedule has {scheduler.schedule.num_levels}"
        )
    if replace_levels is not None:
        x_t = replace_levels(x_t, scheduler.start_time)
    batch, device = x_t[-1].shape[0], x_t[0].device
    bar = {"desc": scheduler.name or "sampling", "leave": False, "disable": not progress}
    if isinstance(progress, dict):  # tqdm options (the pipeline's set_progress_bar_config)
        bar.update({"disable": False, **progress})
    for index in tqdm(range(len(scheduler.timesteps)), **bar):
        t = scheduler.current_time
        predictions = denoiser(scheduler.scale_model_input(x_t), scheduler.model_time(batch, device))
        out = scheduler.step(predictions, x_t, generator)
        x_t = out.prev_sample
        if replace_levels is not None:
            x_t = replace_levels(x_t, out.time)
        if callback is not None:
            replaced = callback(StepState(index, t, out.time, out.pred_original_sample, x_t, len(scheduler.timesteps)))
            if replaced is not None:
                x_t = list(replaced)
    return [(x * scale).clip(-1, 1) for x, scale in zip(x_t, scheduler.schedule.signal_scales, strict=True)]


def condition_on_levels(
    known: dict[int, torch.Tensor],
    schedule: PyramidSchedule,
    generator: Generators = None,
) -> Callable[[list[torch.Tensor], float], list[torch.Tensor]]:
    """A `replace_levels` hook that pins the given levels to known images (super-resolution, variations).

    known: level index (0 = highest resolution) -> clean image in [-1, 1], (C, H_r, W_r) or (B or 1,
    C, H_r, W_r), e.g. {1: a 16x16 picture} for a 2-level 32/16 model. At every step end s the hook
    replaces each known level by that image noised to s with fresh noise, add_noise(image, z, gamma_r(s)),
    and by the clean image itself at s = 0, so the other levels are denoised consistent with it and the
    returned known level equals the image. Fractional s uses the continuous (log-SNR interpolated)
    schedule (`PyramidSchedule.gammas_at`). generator: for the fresh noise (on the samples' device).
    The loop takes it under every scheduler: `sampling.sample(..., replace_levels=hook)`.
    """
    if not known:
        raise ValueError("condition_on_levels needs at least one known level")
    images: dict[int, torch.Tensor] = {}
    for level, image in known.items():
        if not isinstance(level, int) or not 0 <= level < schedule.num_levels:
            raise ValueError(f"known level {level!r} is not a level index in [0, {schedule.num_levels - 1}]")
        if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
            raise ValueError(f"known level {level} must be an image tensor (C, H, W) or (B, C, H, W)")
        images[level] = (image if image.ndim == 4 else image.unsqueeze(0)) / schedule.signal_scales[level]

    def replace(pyramid: list[torch.Tensor], s: float) -> list[torch.Tensor]:
        out = list(pyramid)
        for level, image in images.items():
            x = out[level]
            if image.shape[1:] != x.shape[1:] or image.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"the known image for level {level} has shape {tuple(image.shape)}; the level is "
                    f"{tuple(x.shape)} (give (C, H, W), (1, C, H, W) or one image per sample)"
                )
            clean = image.to(device=x.device, dtype=x.dtype).expand_as(x)
            if s <= 0:
                out[level] = clean.clone()
                continue
            z = randn(tuple(x.shape), generator, x.device, x.dtype)
            gamma = torch.tensor(schedule.gammas_at(s)[level], device=x.device, dtype=x.dtype)
            out[level] = pyr.add_noise(clean, z, gamma)
        return out

    return replace
