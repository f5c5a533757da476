"""Sample grids during training: a few DDIM steps from fixed noise, every level side by side."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from matryoshka.atomic import atomic_path
from matryoshka.data import make_grid
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.sampling import sample
from matryoshka.schedulers import DDIMScheduler


@torch.no_grad()
def sample_pyramid(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    schedule: PyramidSchedule,
    conditional: dict,
    unconditional: dict,
    count: int,
    steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """`count` samples of every level (highest first) from noise drawn with `seed` (the same every call),
    through the one sampling loop with a DDIM scheduler and the pipeline's guidance (training sits below
    the pipeline, so it does not build one)."""
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn((count, *shape), generator=generator).to(device) for shape in model.config.level_shapes()]
    if conditional and guidance != 1:
        denoiser = classifier_free_guidance(model, conditional, unconditional, guidance)
    else:
        denoiser = lambda pyramid, t: model(pyramid, t, **conditional)  # noqa: E731
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(
        min(steps, schedule.num_train_steps), schedule, prediction=diffusion.prediction, threshold=diffusion.threshold
    )
    return sample(denoiser, noise, scheduler)


def preview_labels(mdm, count: int, prompts: list[str] | None) -> list[str] | None:
    """What each preview row shows, in the order `BatchConditioner.for_samples` conditions them: the class
    name (labels cycle over the classes) or the prompt (prompts cycle); None for unconditional models."""
    if mdm.model.num_classes > 0:
        names = mdm.class_names or [str(i) for i in range(mdm.model.num_classes)]
        return [names[i % len(names)] for i in range(count)]
    if mdm.model.text_dim > 0:
        prompts = prompts or [""]
        return [prompts[i % len(prompts)] or "(empty prompt)" for i in range(count)]
    return None


def pyramid_grid(levels: list[torch.Tensor]) -> Image.Image:
    """One row per sample, its levels from lowest to highest resolution, each scaled to the top size.

    Videos (B, C, T_r, S_r, S_r): one row per sample and level (lowest first), one column per top-level
    frame; a level with fewer frames shows each of its frames under the top frames it stands for."""
    if levels[0].ndim == 5:
        return _video_grid(levels)
    size = levels[0].shape[-1]
    count = levels[0].shape[0]
    scaled = [F.interpolate(level.float().cpu(), size=(size, size), mode="nearest") for level in reversed(levels)]
    tiles = torch.stack(scaled, dim=1).reshape(count * len(levels), *levels[0].shape[1:])
    return make_grid(tiles, nrow=len(levels))


def _video_grid(levels: list[torch.Tensor]) -> Image.Image:
    count, _, frames, size, _ = levels[0].shape
    rows = []
    for level in reversed(levels):
        level = level.float().cpu().repeat_interleave(frames // level.shape[2], dim=2)  # (B, C, T, S_r, S_r)
        flat = level.transpose(1, 2).flatten(0, 1)  # (B * T, C, S_r, S_r)
        rows.append(F.interpolate(flat, size=(size, size), mode="nearest").unflatten(0, (count, frames)))
    tiles = torch.stack(rows, dim=1).flatten(0, 2)  # sample-major, then level, then frame
    return make_grid(tiles, nrow=frames)


def save_grid(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


__all__ = ["pyramid_grid", "sample_pyramid", "save_grid"]
