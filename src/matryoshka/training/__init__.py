"""Training: the loop (`train`), progressive stages, EMA, checkpoints, data order, distributed setup.

    from matryoshka.training import load_train_config, train
    config = load_train_config("configs/fashion_tiny_32x16.yaml", ["optim.lr=2e-4"])
    result = train(config, "runs/fashion", resume=True)

The command line is `matryoshka train CONFIG.yaml --out DIR [--resume] [--max-steps N] [--set k=v]`.
"""

from matryoshka.training.config import (
    CheckpointConfig,
    DataConfig,
    EMAConfig,
    LoggingConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
    apply_overrides,
    load_train_config,
)
from matryoshka.training.ema import EMA
from matryoshka.training.loop import TrainResult, diffusion_loss, train
from matryoshka.training.monitor import read_metrics
from matryoshka.training.stages import initial_models, nest_model, nest_weights, stage_mdm_config

__all__ = [
    "EMA",
    "CheckpointConfig",
    "DataConfig",
    "EMAConfig",
    "LoggingConfig",
    "OptimConfig",
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "diffusion_loss",
    "initial_models",
    "load_train_config",
    "nest_model",
    "nest_weights",
    "read_metrics",
    "stage_mdm_config",
    "train",
]
