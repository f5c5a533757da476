"""Samplers over a whole pyramid: DDPM ancestral and DDIM(eta), with guidance and thresholding.

All levels are denoised jointly: at every step the network sees the whole noisy pyramid at one time
index and each level moves from its own noise level gamma_r[t] to gamma_r[s] (REFERENCE.md section 4).
The model is any callable `denoiser(pyramid, t_model) -> predictions`; guidance is a wrapper around
such a callable (`matryoshka.guidance`: classifier-free, interval, rescale, autoguidance), so samplers own
no weights and know no conditioning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from matryoshka import pyramid as pyr
from matryoshka.diffusion import PyramidSchedule

Denoiser = Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
StepCallback = Callable[["StepState"], None]
SAMPLERS = ("ddim", "ddpm")


@dataclass
class StepState:
    """What a per-step callback sees after step `index` (t -> s)."""

    index: int
    t: int
    s: int
    x0: list[torch.Tensor]  # thresholded clean estimates, highest first
    xt: list[torch.Tensor]  # states after the step


def threshold(x0: torch.Tensor, kind: str, signal_scale: float = 1.0) -> torch.Tensor:
    """Keep the x0 estimate in range: "clip" to [-1, 1]; "dynamic" (Imagen: 99.5th percentile of |x0|,
    at most 100) or "dynamic_if" (DeepFloyd IF: 95th percentile, at most 1.5) rescale each sample by
    its percentile s >= 1 after clipping to [-s, s]; "none". signal_scale: the level's signal was
    divided by it, so the range is [-1/scale, 1/scale]."""
    if kind == "none":
        return x0
    x = x0 * signal_scale
    if kind == "clip":
        x = x.clip(-1, 1)
    elif kind in ("dynamic", "dynamic_if"):
        ratio, max_value = (0.995, 100.0) if kind == "dynamic" else (0.95, 1.5)
        flat = x.float().reshape(x.shape[0], -1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
        x = (flat.clamp(-s, s) / s).reshape(x.shape).to(x0.dtype)
    else:
        raise ValueError(f"unknown threshold {kind!r}; use clip, dynamic, dynamic_if or none")
    return x / signal_scale


def ddim_step(
    x_t: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, g_s: torch.Tensor, eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM(eta) from noise level g to g_s (g, g_s: (B,) alpha-bar) given the x0 estimate."""
    g, g_s = pyr._expand(g, x_t), pyr._expand(g_s, x_t)
    eps = (x_t - g.sqrt() * x0) / (1 - g).sqrt()
    if eta <= 0:
        return g_s.sqrt() * x0 + (1 - g_s).sqrt() * eps
    beta_tilde = eta**2 * (1 - g / g_s) * (1 - g_s) / (1 - g)
    x_s = g_s.sqrt() * x0 + (1 - g_s - beta_tilde).clamp(min=0).sqrt() * eps
    return x_s if noise is None else x_s + beta_tilde.sqrt() * noise


def ddpm_step(
    x_t: torch.Tensor, x0: torch.Tensor, g: torch.Tensor, g_s: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """Ancestral DDPM step: the posterior q(x_s | x_t, x0) mean plus its standard deviation times noise."""
    g, g_s = pyr._expand(g, x_t), pyr._expand(g_s, x_t)
    alpha = g / g_s
    beta = 1 - alpha
    mean = x0 * beta * g_s.sqrt() / (1 - g) + x_t * alpha.sqrt() * (1 - g_s) / (1 - g)
    if noise is None:
        return mean
    return mean + (beta * (1 - g_s) / (1 - g)).sqrt() * noise


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: list[torch.Tensor],
    schedule: PyramidSchedule,
    timesteps: torch.Tensor,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    prediction: str = "v",
    threshold_kind: str = "clip",
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    replace_levels: Callable[[list[torch.Tensor], int], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Run the reverse process from `noise` (the pyramid at timesteps[0]) to timesteps[-1].

    timesteps: descending int64 times (see schedule.spaced_timesteps); the network receives t - 1.
    method: "ddim" (with eta) or "ddpm" (ancestral). Returns the final pyramid, each level clipped to
    [-1, 1] after undoing its signal scale. replace_levels(pyramid, s) may overwrite levels after each
    step (used to condition on a given low-resolution image).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(SAMPLERS)}")
    x_t = list(noise)
    batch = x_t[-1].shape[0]
    device = x_t[0].device
    steps = timesteps.tolist()
    for index in tqdm(range(len(steps) - 1), disable=not progress, desc="sampling", leave=False):
        t, s = steps[index], steps[index + 1]
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        s_batch = torch.full((batch,), s, dtype=torch.long, device=device)
        g_t, g_s = schedule.at(t_batch, x_t[0].dtype), schedule.at(s_batch, x_t[0].dtype)
        predictions = denoiser([pyr.model_input(x, g, prediction) for x, g in zip(x_t, g_t, strict=True)], t_batch - 1)
        x0s, next_states = [], []
        for level, (x, pred) in enumerate(zip(x_t, predictions, strict=True)):
            x0 = pyr.to_x0(x, pred, g_t[level], prediction)
            x0 = threshold(x0, threshold_kind, schedule.signal_scales[level])
            add_noise = s > 0 and (method == "ddpm" or eta > 0)
            z = (
                torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype) if add_noise else None
            )
            if method == "ddim":
                x_s = ddim_step(x, x0, g_t[level], g_s[level], eta, z)
            else:
                x_s = ddpm_step(x, x0, g_t[level], g_s[level], z)
            x0s.append(x0)
            next_states.append(x_s)
        x_t = next_states
        if replace_levels is not None:
            x_t = replace_levels(x_t, s)
        if callback is not None:
            callback(StepState(index, t, s, x0s, x_t))
    return [(x * scale).clip(-1, 1) for x, scale in zip(x_t, schedule.signal_scales, strict=True)]


def condition_on_levels(
    known: dict[int, torch.Tensor],
    schedule: PyramidSchedule,
    generator: torch.Generator | None = None,
) -> Callable[[list[torch.Tensor], float], list[torch.Tensor]]:
    """A `replace_levels` hook that pins the given levels to known images (super-resolution, variations).

    known: level index (0 = highest resolution) -> clean image in [-1, 1], (C, H_r, W_r) or (B or 1,
    C, H_r, W_r), e.g. {1: a 16x16 picture} for a 2-level 32/16 model. At every step end s the hook
    replaces each known level by that image noised to s with fresh noise, add_noise(image, z, gamma_r(s)),
    and by the clean image itself at s = 0, so the other levels are denoised consistent with it and the
    returned known level equals the image. Fractional s uses the continuous (log-SNR interpolated)
    schedule of `matryoshka.solvers`. generator: for the fresh noise (on the samples' device).
    Every sampler takes it: `sampling.sample(..., replace_levels=hook)`, `solvers.solve`, `solvers.run_sampler`.
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
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            gamma = torch.tensor(schedule.gammas_at(s)[level], device=x.device, dtype=x.dtype)
            out[level] = pyr.add_noise(clean, z, gamma)
        return out

    return replace
