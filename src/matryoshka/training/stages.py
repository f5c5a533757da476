"""Progressive training: the model, diffusion config and starting weights of each stage.

Stage i trains `NestedUNet(final.innermost(levels_i))`. Entering a stage nests the previous stage's
model (or a model loaded with `init_inner_from`) inside the new outer levels: its weights go into
the new model's inner band, whose zero-initialised adapters leave the inner predictions exactly as
they were, so training continues where the last stage ended. EMA weights are nested the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import BUNDLED_DIR, MDMConfig, bundled_models, load_model_dir
from matryoshka.models import ModelConfig, NestedUNet
from matryoshka.training.config import StageConfig, TrainConfig
from matryoshka.typed_config import ConfigError, to_dict


def stage_diffusion(diffusion: DiffusionConfig, stage: StageConfig) -> DiffusionConfig:
    """The diffusion config of a stage: per-level lists cut to its innermost `stage.levels` levels."""
    k = stage.levels
    weights = stage.level_weights
    if weights is None and diffusion.level_weights is not None:
        weights = diffusion.level_weights[-k:]
    mixed = diffusion.mixed_ratio[-k:] if diffusion.mixed_ratio is not None else None

    def innermost(values):  # a per-level list, or one value for every level
        return values[-k:] if isinstance(values, list) else values

    return dataclasses.replace(
        diffusion, level_weights=weights, mixed_ratio=mixed, loss_weighting=innermost(diffusion.loss_weighting),
        sigmoid_bias=innermost(diffusion.sigmoid_bias),
    )


def stage_mdm_config(config: TrainConfig, stage_index: int) -> MDMConfig:
    """The MDMConfig of the model a stage trains (what its exported model directory holds)."""
    stage = config.stages[stage_index]
    return dataclasses.replace(
        config.mdm,
        model=config.mdm.model.innermost(stage.levels),
        diffusion=stage_diffusion(config.mdm.diffusion, stage),
    )


def band_at(model: NestedUNet, depth: int) -> NestedUNet:
    """The nested model `depth` levels inside `model` (0 = the model itself)."""
    for _ in range(depth):
        model = model.inner_unet
    return model


def nest_weights(model: NestedUNet, inner_state: dict[str, torch.Tensor], inner_levels: int) -> None:
    """Load a trained `inner_levels`-level model's weights into the matching inner band of `model`."""
    depth = model.config.num_levels - inner_levels
    if depth < 0:
        raise ValueError(f"cannot nest a {inner_levels}-level model into a {model.config.num_levels}-level one")
    band_at(model, depth).load_state_dict(inner_state)


def nest_model(old: NestedUNet, config: ModelConfig) -> NestedUNet:
    """A new model of `config` whose innermost levels are `old` (same weights, same inner outputs)."""
    new = NestedUNet(config)
    check_inner_config(old.config, config)
    nest_weights(new, old.state_dict(), old.config.num_levels)
    return new


def check_inner_config(inner: ModelConfig, outer: ModelConfig, field_name: str = "init_inner_from") -> None:
    """Refuse to nest a model that is not exactly the innermost levels of `outer`."""
    if inner.num_levels > outer.num_levels:
        raise ConfigError(
            field_name, f"the model has {inner.num_levels} levels, more than the stage's {outer.num_levels}"
        )
    expected = to_dict(outer.innermost(inner.num_levels))
    found = to_dict(inner)
    different = sorted(key for key in expected if expected[key] != found.get(key))
    if different:
        details = "; ".join(f"{key}: expected {expected[key]!r}, found {found.get(key)!r}" for key in different[:3])
        raise ConfigError(
            field_name,
            f"the model is not the innermost {inner.num_levels} level(s) of mdm.model ({details})",
        )


def load_inner_model(path: str | Path, field_name: str = "init_inner_from") -> NestedUNet:
    """A trained model to nest or fine-tune: one of our model directories, or an official ml-mdm checkpoint."""
    path = Path(path)
    if not path.exists() and str(path) in bundled_models():  # a bundled model by name ("fashion-t2i")
        path = BUNDLED_DIR / str(path)
    if path.is_dir():
        model, _ = load_model_dir(path)
        return model
    if path.is_file():
        from matryoshka.interop import load_official

        model, _, _ = load_official(path)
        return model
    raise ConfigError(field_name, f"{path} is neither a model directory nor an official checkpoint file")


def initial_models(
    config: TrainConfig,
    stage_index: int,
    previous: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int] | None,
) -> tuple[NestedUNet, NestedUNet]:
    """(model, EMA model) at the start of a stage, on the CPU.

    previous: (weights, EMA weights, number of levels) of the model the last stage ended with, or None.
    New outer levels are initialised from a generator seeded by (seed, stage), so every rank builds
    the same weights and a resumed run builds what an uninterrupted one did.
    """
    stage = config.stages[stage_index]
    target = config.mdm.model.innermost(stage.levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1000 + stage_index)
        model = NestedUNet(target)
    if stage.init_from is not None:  # fine-tuning a whole model: its weights, all of the stage's levels
        loaded = load_inner_model(stage.init_from, "init_from")
        if loaded.config.num_levels != target.num_levels:
            raise ConfigError(
                "init_from", f"the model has {loaded.config.num_levels} levels but the stage trains {target.num_levels}"
            )
        check_inner_config(loaded.config, target, "init_from")
        model.load_state_dict(loaded.state_dict())
        return model, copy.deepcopy(model)
    inner = previous
    if stage.init_inner_from is not None:
        loaded = load_inner_model(stage.init_inner_from)
        if target.num_frames and not loaded.config.num_frames:  # an image model starts a video model
            return _inflated(model, loaded)
        check_inner_config(loaded.config, target)
        weights = loaded.state_dict()
        inner = (weights, weights, loaded.config.num_levels)
    elif previous is not None:
        check_inner_config(config.mdm.model.innermost(previous[2]), target)
    ema_model = copy.deepcopy(model)
    if inner is not None:
        weights, ema_weights, levels = inner
        nest_weights(model, weights, levels)
        nest_weights(ema_model, ema_weights, levels)
    return model, ema_model


def _inflated(model: NestedUNet, image: NestedUNet) -> tuple[NestedUNet, NestedUNet]:
    """(model, EMA model) holding the image model's weights; temporal layers stay at identity."""
    from matryoshka.video import load_image_weights

    try:
        load_image_weights(model, image)
    except ValueError as error:
        raise ConfigError("init_inner_from", f"cannot inflate the image model into the video model: {error}") from None
    return model, copy.deepcopy(model)


__all__ = [
    "band_at",
    "check_inner_config",
    "initial_models",
    "load_inner_model",
    "nest_model",
    "nest_weights",
    "stage_diffusion",
    "stage_mdm_config",
]
