"""Shared helpers for the tests (not a test module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from matryoshka import sampling
from matryoshka.schedulers import make_scheduler

METHODS = ("ddim", "ddpm", "dpmpp_2m", "euler", "heun")
SOLVERS = ("dpmpp_2m", "euler", "heun")


def run_sampler(denoiser, noise, schedule, timesteps, *, method: str = "ddim", eta: float = 0.0,
                prediction: str = "v", threshold_kind: str = "clip", generator=None, callback=None,
                progress: bool = False, replace_levels=None):
    """The one loop with the named scheduler on the given time grid (what the pipeline does)."""
    scheduler = make_scheduler(method, eta)
    scheduler.set_timesteps(None, schedule, prediction=prediction, threshold=threshold_kind, timesteps=timesteps)
    return sampling.sample(denoiser, noise, scheduler, generator=generator, callback=callback, progress=progress,
                           replace_levels=replace_levels)


def random_model(config, seed: int = 0, scale: float = 0.2):
    """A NestedUNet whose zero-initialised layers are made non-zero, so every input changes the output."""
    import torch

    from matryoshka.models import NestedUNet

    torch.manual_seed(seed)
    model = NestedUNet(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses of the module look themselves up here
    spec.loader.exec_module(module)
    return module
