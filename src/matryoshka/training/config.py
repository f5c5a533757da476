"""The typed config of a training run (`TrainConfig`), loaded from YAML with `--set key=value` overrides.

    mdm:          the model directory's config (network + diffusion + text encoder + class names)
    data:         which dataset, global batch size, conditioning dropout, fault tolerance
    optim:        AdamW, learning-rate schedule, clipping, accumulation, precision
    stages:       progressive training: each stage trains the `levels` innermost levels for `steps` steps
    ema, checkpoint, logging, distributed, device, seed

Every field is checked on load (`matryoshka.typed_config`): an unknown key, a wrong type or a value
that cannot work is refused with the field's dotted path in the message.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from matryoshka.lora import LoRAConfig
from matryoshka.model_dir import MDMConfig
from matryoshka.typed_config import ConfigError, from_dict, require

VIDEO_DATASETS: tuple[str, ...] = ("moving_fashion_mnist", "video_folder", "video_shards")


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    dataset: Literal[
        "fashion_mnist", "folder", "shards", "moving_fashion_mnist", "video_folder", "video_shards"
    ] = "fashion_mnist"
    # fashion_mnist, moving_fashion_mnist: directory of the IDX files (null: the Debian package, then the
    # cache); folder, video_folder: the root; shards, video_shards: a brace pattern
    # ("data/{00000..00099}.tar") or a list of tar paths. The video kinds need mdm.model.num_frames > 0.
    path: str | list[str] | None = None
    split: Literal["train", "test"] = "train"  # fashion_mnist, moving_fashion_mnist
    fit: Literal["pad", "resize"] = "pad"  # fashion_mnist: pad 28 px onto the canvas, or resize
    captions: bool = True  # folder: read sidecar .txt captions
    labels: bool = False  # folder: class label = index of the first-level subfolder (root/<class>/...)
    stride: int = 1  # video_folder, video_shards: clips take every stride-th frame of the video
    # Images per micro-step summed over all ranks (each rank gets batch_size / world_size).
    batch_size: int = 32
    num_workers: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1000  # shards: samples held for shuffling
    limit: int | None = None  # fashion_mnist/folder: use only the first `limit` items (quick runs)
    # Classifier-free guidance: share of samples whose label / caption is replaced by the null one.
    cond_dropout: float = 0.1
    # Directory of a matryoshka.conditioning.EmbeddingCache: captions are encoded once and read back.
    embedding_cache: str | None = None
    max_failure_ratio: float = 0.1  # stop when more than this share of samples fails to load
    min_samples: int = 100  # ... counted only after this many samples were attempted

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        require(self.limit is None or self.limit >= 1, "limit", "must be >= 1 (or null for all)")
        require(0 <= self.cond_dropout < 1, "cond_dropout", "must be in [0, 1)")
        require(0 <= self.max_failure_ratio <= 1, "max_failure_ratio", "must be in [0, 1]")
        require(self.min_samples >= 0, "min_samples", "must be >= 0")
        require(self.stride >= 1, "stride", "must be >= 1")
        require(
            self.dataset in ("fashion_mnist", "moving_fashion_mnist") or self.path is not None,
            "path",
            f"is required for dataset {self.dataset!r} (the image folder or the shard pattern)",
        )
        require(not self.labels or self.dataset == "folder", "labels", "only applies to dataset 'folder'")
        require(
            self.dataset in ("shards", "video_shards") or not isinstance(self.path, list),
            "path",
            "a list of paths is only accepted for dataset 'shards'",
        )


@dataclass
class OptimConfig:
    """AdamW, its learning-rate schedule (per stage), and how the step is computed."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0  # linear warm-up at the start of every stage (each stage has a fresh optimizer)
    min_lr_ratio: float = 0.0  # cosine: the final learning rate as a fraction of lr
    grad_clip: float | None = 1.0  # maximum global gradient norm; null = no clipping
    # A step whose loss or gradients are NaN/inf is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = 10
    grad_accum: int = 1  # micro-steps per optimizer step
    # "auto": fused AdamW on CUDA and CPU, foreach elsewhere and for sharded (FSDP) models.
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    # "auto": bf16 autocast on CUDA devices that support it, fp32 elsewhere; "bf16" also works on CPU.
    # "fp16": float16 autocast with loss scaling (torch.amp.GradScaler, its state in every checkpoint), for
    # GPUs without bf16 (V100, T4); a step whose scaled gradients overflow is skipped and the scale lowered.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = False
    gradient_checkpointing: bool = False  # recompute the outer bands' activations in the backward pass
    # torch.compile the network's training forward (and so its backward): fuses the element-wise work
    # between convolutions. The first step of every stage compiles (minutes on a small CPU; cached on
    # disk, so a rerun of the same model compiles in seconds). Previews and exports stay eager.
    compile: bool = False
    # CPU runs: make glibc's malloc keep freed memory for the next step instead of returning it to the
    # system (matryoshka.cpu_allocator): no page faults on every step's fresh activations (faster CPU
    # steps, BENCHMARKS.md "Performance"). The process keeps its peak heap.
    keep_freed_memory: bool = True

    def validate(self) -> None:
        require(self.lr > 0, "lr", "must be positive")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "needs two values in [0, 1)")
        require(self.eps > 0, "eps", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive (or null: no clipping)")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


@dataclass
class PlateauConfig:
    """End a stage early when its held-out loss stops improving (matryoshka.training.plateau)."""

    every: int = 200  # steps of the stage between measurements of the EMA model's held-out loss
    patience: int = 3  # measurements in a row without improvement that end the stage
    min_delta: float = 0.01  # relative improvement over the best that counts as one
    min_steps: int = 0  # the stage never ends before this many of its steps
    batch_size: int = 256  # held-out images measured (at fixed, evenly spread times and fixed noise)

    def validate(self) -> None:
        require(self.every >= 1, "every", "must be >= 1")
        require(self.patience >= 1, "patience", "must be >= 1")
        require(0 <= self.min_delta < 1, "min_delta", "must be in [0, 1)")
        require(self.min_steps >= 0, "min_steps", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass
class StageConfig:
    """One progressive stage: train the `levels` innermost levels of the final model for `steps` steps."""

    levels: int
    steps: int
    # Loss weight of each of the stage's levels, highest first; null = mdm.diffusion.level_weights
    # (its innermost entries) or 1 each.
    level_weights: list[float] | None = None
    # Video models: train on one frame per clip, as images (temporal layers skip single frames, so they
    # stay at identity): the image-like base that later video stages start from.
    frames_as_images: bool = False
    lr: float | None = None  # null = optim.lr
    batch_size: int | None = None  # null = data.batch_size
    warmup_steps: int | None = None  # null = optim.warmup_steps
    # null = optim.schedule. A stage that ends on a plateau wants "constant": under a cosine that anneals
    # over the stage's maximum the held-out loss keeps falling with the learning rate, so it never plateaus.
    lr_schedule: Literal["constant", "cosine"] | None = None
    # Start from a trained model as the inner model: one of our model directories, or an official
    # ml-mdm checkpoint file (converted with matryoshka.interop.load_official). For a video model this may
    # be an image model: it is inflated (matryoshka.video.inflate_image_model).
    init_inner_from: str | None = None
    # Start from a whole trained model (all of the stage's levels): fine-tuning. One of our model
    # directories or an official ml-mdm checkpoint file; its levels must be exactly the stage's.
    init_from: str | None = None
    # Which weights the stage trains: "all", or "temporal" (a video model's temporal layers and frame
    # embeddings only, e.g. after inflating an image model into it; the image weights stay as they are).
    trainable: Literal["all", "temporal"] = "all"
    # Automatic stage end (the paper's future work): `steps` becomes the maximum; the stage ends when the
    # EMA model's held-out loss stops improving. null = the stage runs all its steps.
    end_on_plateau: PlateauConfig | None = None

    def validate(self) -> None:
        require(self.levels >= 1, "levels", "must be >= 1")
        require(self.steps >= 1, "steps", "must be >= 1")
        require(
            self.level_weights is None or len(self.level_weights) == self.levels,
            "level_weights",
            f"has {len(self.level_weights or [])} entries for a stage of {self.levels} levels",
        )
        require(
            self.level_weights is None or all(w >= 0 for w in self.level_weights), "level_weights", "must be >= 0"
        )
        require(self.lr is None or self.lr > 0, "lr", "must be positive")
        require(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(
            self.init_from is None or self.init_inner_from is None, "init_from",
            "starts the stage from a whole model; init_inner_from nests one inside it: give one of them",
        )


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (what is exported and sampled)."""

    decay: float = 0.9999
    # Warm-up: the decay used after n updates is min(decay, (1 + n) / (10 + n)), restarted every stage.
    warmup: bool = True

    def validate(self) -> None:
        require(0 <= self.decay < 1, "decay", "must be in [0, 1)")


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (0: only at the end of each stage and of the run)
    keep_last: int = 3  # older complete checkpoints are deleted

    def validate(self) -> None:
        require(self.every >= 0, "every", "must be >= 0")
        require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class LoggingConfig:
    every: int = 50  # steps between scalar logs (TensorBoard, metrics.jsonl)
    sample_every: int = 0  # steps between sample grids (0: only at the end of each stage)
    sample_count: int = 8  # samples per grid (0: no grids)
    sample_steps: int = 20  # DDIM steps per sample
    sample_guidance: float = 1.0  # classifier-free guidance scale of the grids (1 = none)
    # Prompts of the grids of a text-conditioned model; null = captions of the first batch.
    sample_prompts: list[str] | None = None
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar (rank 0)

    def validate(self) -> None:
        require(self.every >= 1, "every", "must be >= 1")
        require(self.sample_every >= 0, "sample_every", "must be >= 0")
        require(self.sample_count >= 0, "sample_count", "must be >= 0 (0: no sample grids)")
        require(self.sample_steps >= 1, "sample_steps", "must be >= 1")
        require(self.sample_guidance >= 0, "sample_guidance", "must be >= 0")


@dataclass
class TrainConfig:
    mdm: MDMConfig
    stages: list[StageConfig]
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Under torchrun: "ddp" replicates the model on every rank; "fsdp" shards it (FSDP2 fully_shard).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Train LoRA adapters (matryoshka.lora) instead of the whole network: every stage's model gets them,
    # its other weights are frozen; DIR/lora holds the adapter, DIR/model the model with it fused.
    lora: LoRAConfig | None = None
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    seed: int = 0
    # Training compute of the run, in TFLOP (torch's count of each stage's optimizer step, forward and
    # backward, times its steps: matryoshka.training.flops): the last stage ends where the run has spent
    # it, its `steps` staying its maximum. With automatic stages (end_on_plateau) the compute an earlier
    # stage leaves unspent goes to the last one. null = every stage runs its `steps`.
    budget_tflops: float | None = None

    def validate(self) -> None:
        num_levels = self.mdm.model.num_levels
        require(self.budget_tflops is None or self.budget_tflops > 0, "budget_tflops", "must be positive (or null)")
        require(len(self.stages) >= 1, "stages", "needs at least one stage")
        previous = 0
        for i, stage in enumerate(self.stages):
            require(
                stage.levels <= num_levels,
                f"stages[{i}].levels",
                f"is {stage.levels} but the model (mdm.model) has only {num_levels} levels",
            )
            require(
                stage.levels >= previous,
                f"stages[{i}].levels",
                f"is {stage.levels}, fewer than the previous stage's {previous}: stages must nest "
                "(each stage trains at least the levels of the one before)",
            )
            previous = stage.levels
        require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        require(self.seed >= 0, "seed", "must be >= 0")
        require(
            self.lora is None or (len(self.stages) == 1 and self.stages[0].init_from is not None),
            "lora", "adapts a trained model: give one stage, with init_from (the model to adapt)",
        )
        video_data = self.data.dataset in VIDEO_DATASETS
        require(
            video_data == (self.mdm.model.num_frames > 0),
            "data.dataset",
            f"{self.data.dataset!r} gives {'clips' if video_data else 'images'} but mdm.model.num_frames is "
            f"{self.mdm.model.num_frames}: use {'an image' if video_data else 'a video'} dataset or model",
        )
        for i, stage in enumerate(self.stages):
            require(
                stage.trainable == "all" or self.mdm.model.num_frames > 0,
                f"stages[{i}].trainable", "temporal only applies to video models (mdm.model.num_frames > 0)",
            )
            require(
                stage.end_on_plateau is None or self.data.dataset not in ("shards", "video_shards"),
                f"stages[{i}].end_on_plateau",
                f"needs held-out items from a map-style dataset; {self.data.dataset!r} streams its samples",
            )
            require(
                not stage.frames_as_images or self.mdm.model.num_frames > 0,
                f"stages[{i}].frames_as_images",
                "only applies to video models (mdm.model.num_frames > 0)",
            )
        if self.data.dataset in ("fashion_mnist", "moving_fashion_mnist"):
            require(
                self.mdm.model.in_channels in (1, 3),
                "mdm.model.in_channels",
                "Fashion-MNIST images have 1 channel (or 3, repeated)",
            )

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_bounds(self, ended: dict[int, int] | None = None, stage_flops: list[float] | None = None) -> list[int]:
        """Global step at which each stage starts, plus the total: [0, s0, s0 + s1, ...].

        ended: stage index -> the steps it actually ran, for stages that ended on a plateau.
        stage_flops: each stage's FLOPs per optimizer step; needed with budget_tflops, which sizes the last
        stage (until the earlier ones have ended, as if they ran all their steps)."""
        ended = ended or {}
        steps = [ended.get(index, stage.steps) for index, stage in enumerate(self.stages)]
        last = len(steps) - 1
        if self.budget_tflops is not None and last not in ended:
            if stage_flops is None:
                raise ValueError("budget_tflops: the stage bounds need each stage's FLOPs per step")
            steps[last] = min(steps[last], steps_within_budget(self.budget_tflops * 1e12, steps[:-1], stage_flops))
        return list(itertools.accumulate(steps, initial=0))


def steps_within_budget(budget_flops: float, earlier_steps: list[int], stage_flops: list[float]) -> int:
    """Steps of the last stage that make a run spend `budget_flops`, after its earlier stages' steps."""
    earlier = sum(steps * flops for steps, flops in zip(earlier_steps, stage_flops[:-1], strict=True))
    steps = round((budget_flops - earlier) / stage_flops[-1])
    if steps < 1:
        raise ConfigError(
            "budget_tflops", f"{budget_flops / 1e12:.4g} TFLOP do not cover the earlier stages ({earlier / 1e12:.4g} "
            "TFLOP): raise it, or shorten them",
        )
    return steps


_EXPONENT_NUMBER = re.compile(r"^[-+]?\d+[eE][-+]?\d+$")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a raw config dict (a copy); values are parsed as YAML.

    A numeric path component indexes a list: `stages.0.steps=10`. Missing mappings are created, so a
    wrong key reaches the typed check and is refused there with its path.
    """
    raw = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(key or item, f"override {item!r} must look like key.path=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(key, f"cannot parse {text!r} as a YAML value: {err}") from None
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string; on a command line it is a number
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(here, f"no list entry {part!r} (the list has {len(node)} entries)")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(here, f"cannot set a key inside the value {node!r}")
    return raw


def load_train_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML, apply `--set` overrides, and validate the result."""
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return from_dict(TrainConfig, apply_overrides(raw or {}, overrides or []))


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EMAConfig",
    "LoggingConfig",
    "OptimConfig",
    "PlateauConfig",
    "StageConfig",
    "TrainConfig",
    "apply_overrides",
    "load_train_config",
]
