"""A model directory, our on-disk format: config.yaml + model.safetensors (+ model_card.md).

config.yaml holds an `MDMConfig`: the network, the diffusion process and which text encoder (if any)
the model was trained with. Weights are safetensors only: loading one never runs code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from matryoshka.atomic import atomic_path, atomic_write_text
from matryoshka.diffusion import DiffusionConfig
from matryoshka.models.config import ModelConfig
from matryoshka.models.unet import NestedUNet
from matryoshka.typed_config import ConfigError, load_yaml, require, save_yaml

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
BUNDLED_DIR = Path(__file__).resolve().parent / "assets"  # the models that ship inside the package


def bundled_models() -> list[str]:
    """Names of the models that ship inside the package ("fashion-t2i", ...)."""
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / CONFIG_NAME).is_file()) if BUNDLED_DIR.is_dir() else []


@dataclass
class SamplingDefaults:
    """The sampling settings a model recommends: `matryoshka generate`, the demo and the pipeline use them
    unless told otherwise. The defaults are the official models' (50 DDIM steps, guidance 7.5)."""

    num_inference_steps: int = 50
    guidance_scale: float | list[float] = 7.5
    sampler: str = "ddim"  # a scheduler shorthand (matryoshka.schedulers)
    eta: float = 0.0  # the scheduler's eta (ddim)

    def validate(self) -> None:
        require(self.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")
        scales = self.guidance_scale if isinstance(self.guidance_scale, list) else [self.guidance_scale]
        require(all(w >= 0 for w in scales), "guidance_scale", "must be >= 0")
        require(self.eta >= 0, "eta", "must be >= 0")


@dataclass
class MDMConfig:
    """Everything needed to rebuild and run a trained model."""

    model: ModelConfig
    diffusion: DiffusionConfig
    # Text encoder spec for matryoshka.conditioning.load_text_encoder ("minilm", "t5:google/flan-t5-xl").
    text_encoder: str | None = None
    # Names of the classes of a class-conditional model (index = label).
    class_names: list[str] | None = None
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def validate(self) -> None:
        try:
            self.diffusion.check_levels(self.model.num_levels)
        except ConfigError as err:  # name the field from here: diffusion.level_weights, not level_weights
            raise ConfigError(f"diffusion.{err.path}", str(err).split(": ", 1)[1]) from None
        require(
            self.text_encoder is None or self.model.text_dim > 0,
            "text_encoder",
            "is set but the model has no text conditioning (model.text_dim = 0)",
        )
        if self.class_names is not None:
            require(
                len(self.class_names) == self.model.num_classes,
                "class_names",
                f"has {len(self.class_names)} names for model.num_classes = {self.model.num_classes}",
            )


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors file written atomically (temp file + rename)."""
    with atomic_path(path) as temporary:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(temporary))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def save_model_dir(directory: str | Path, model: NestedUNet, config: MDMConfig, card: str | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), directory / WEIGHTS_NAME)
    save_yaml(config, directory / CONFIG_NAME)
    if card is not None:
        atomic_write_text(directory / "model_card.md", card)
    return directory


def load_config(directory: str | Path) -> MDMConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a model directory: {CONFIG_NAME} is missing")
    return load_yaml(MDMConfig, path)


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[NestedUNet, MDMConfig]:
    """Rebuild the network from config.yaml and load model.safetensors strictly."""
    config = load_config(directory)
    model = NestedUNet(config.model)
    weights = load_state_dict(Path(directory) / WEIGHTS_NAME)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in weights.items()
                if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise ConfigError(
            "model",
            f"weights in {directory} do not match config.yaml: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {reshaped[:5]}",
        )
    model.load_state_dict(weights)
    return model.to(device).eval(), config
