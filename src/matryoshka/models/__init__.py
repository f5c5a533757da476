"""Network modules: they know nothing of training, files or the command line."""

from matryoshka.models.config import LevelConfig, ModelConfig
from matryoshka.models.unet import NestedUNet

__all__ = ["LevelConfig", "ModelConfig", "NestedUNet"]
