"""The typed config tree of a NestedUNet: one `LevelConfig` per nesting level, outermost first."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from matryoshka.typed_config import ConfigError, require


@dataclass
class LevelConfig:
    """One UNet band: the resolutions it covers, from its input size down to where it nests.

    A level with k entries in `channels` works at k resolutions (k - 1 stride-2 down-samplings), so an
    outer level with 3 entries wraps an inner level whose side is 4x smaller.
    """

    channels: list[int]
    num_res_blocks: list[int]
    # Attention layers after each ResNet at each resolution (0 = none); null = no attention.
    attention_layers: list[int] | None = None
    attention_ffn: bool = False
    num_heads: int = 8
    mid_block: bool = False
    norm_groups: int = 32
    # GroupNorm groups inside attention/FFN; null = norm_groups. ml-mdm hard-codes 32.
    attention_norm_groups: int | None = None
    dropout: float = 0.0
    # Width of the time embedding; null = 4 * channels[0]. Must be a multiple of 8.
    temb_dim: int | None = None
    # Micro-conditioning: name -> default value (ml-mdm's "scale:64" is {scale: 64}).
    micro_conditioning: dict[str, float] = field(default_factory=dict)
    # Outer levels: divide the noisy input by its standard deviation (ml-mdm: skip_normalization false).
    normalize_input: bool = False
    # Outer levels: hand the down-path features to the inner level through in_adapter.
    inner_input: bool = True
    # Video: temporal attention layers after each ResNet at each resolution (0 = none); null = none.
    temporal_attention_layers: list[int] | None = None
    # Video: a temporal convolution (kernel 3 over frames) after each ResNet.
    temporal_conv: bool = False
    # Spatial kernel of those convolutions: 1 = over frames only; 3 = a 3x3x3 space-time kernel, which
    # sees an object move by a pixel per frame directly (at 9x the cost).
    temporal_conv_space: int = 1
    # Video: add an embedding of the frame's index (0..T-1 within this level) to the time embedding of
    # its rows, so every ResNet knows which frame it draws (FiLM), not only the temporal layers. Starts
    # at zero (inflation stays exact); single frames (images) get none.
    frame_embedding: bool = False

    @property
    def time_embedding_dim(self) -> int:
        return self.temb_dim if self.temb_dim is not None else 4 * self.channels[0]

    @property
    def downsampling(self) -> int:
        """Side of the level's input over the side of its innermost resolution."""
        return 2 ** (len(self.channels) - 1)

    def attention_at(self, i: int) -> int:
        return self.attention_layers[i] if self.attention_layers else 0

    def temporal_at(self, i: int) -> int:
        return self.temporal_attention_layers[i] if self.temporal_attention_layers else 0

    def validate(self) -> None:
        n = len(self.channels)
        require(n >= 1, "channels", "needs at least one resolution")
        require(all(c > 0 for c in self.channels), "channels", f"widths must be positive, got {self.channels}")
        require(
            len(self.num_res_blocks) == n,
            "num_res_blocks",
            f"has {len(self.num_res_blocks)} entries for {n} resolutions (channels)",
        )
        require(all(b >= 1 for b in self.num_res_blocks), "num_res_blocks", "each resolution needs >= 1 ResNet")
        for name in ("attention_layers", "temporal_attention_layers"):
            values = getattr(self, name)
            require(
                values is None or len(values) == n,
                name,
                f"has {len(values or [])} entries for {n} resolutions (channels)",
            )
            require(values is None or all(v >= 0 for v in values), name, "counts must be >= 0")
        for i, width in enumerate(self.channels):
            require(
                width % self.norm_groups == 0,
                f"channels[{i}]",
                f"width {width} is not divisible by norm_groups={self.norm_groups} (GroupNorm needs it)",
            )
            if self.attention_at(i) or (self.mid_block and i == n - 1):
                groups = self.attention_norm_groups or self.norm_groups
                require(
                    width % groups == 0,
                    f"channels[{i}]",
                    f"width {width} has attention but is not divisible by attention_norm_groups={groups}",
                )
                require(
                    width % self.num_heads == 0,
                    f"channels[{i}]",
                    f"width {width} is not divisible by num_heads={self.num_heads}",
                )
        require(
            self.time_embedding_dim % 8 == 0,
            "temb_dim",
            f"time-embedding width {self.time_embedding_dim} must be a multiple of 8",
        )
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(
            self.temporal_conv_space >= 1 and self.temporal_conv_space % 2 == 1,
            "temporal_conv_space",
            f"must be an odd kernel size >= 1, got {self.temporal_conv_space}",
        )
        require(all(v > 0 for v in self.micro_conditioning.values()), "micro_conditioning", "defaults must be > 0")


@dataclass
class ModelConfig:
    """A NestedUNet: `levels[0]` is the outermost (highest resolution), `levels[-1]` the core."""

    levels: list[LevelConfig]
    image_size: int  # side of the top level
    in_channels: int = 3
    out_channels: int | None = None  # null = in_channels
    text_dim: int = 0  # width of the text encoder's states; 0 = no text conditioning
    text_proj_dim: int = 0  # > 0: project text states to this width first (in the core)
    pooled_text: bool = True  # add Linear(masked mean of the text) to the time embedding
    masked_cross_attention: bool = True
    num_text_head_layers: int = 0  # trainable self-attention layers over the frozen text states
    num_classes: int = 0  # > 0: class-conditional, with a learned null label for guidance
    num_frames: int = 0  # > 0: a video model whose top level has this many frames
    # Video: per outer level, how many times fewer frames the level below has (1 = space only).
    temporal_ratios: list[int] | None = None

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def cond_dim(self) -> int:
        """Width of the text states that cross-attention sees (after the optional projection)."""
        if self.text_dim <= 0:
            return 0
        return self.text_proj_dim if self.text_proj_dim > 0 else self.text_dim

    @property
    def scales(self) -> list[int]:
        """Side of every level over the core's side, highest first (e.g. [16, 4, 1])."""
        scales = [1]
        for level in reversed(self.levels[:-1]):
            scales.insert(0, scales[0] * level.downsampling)
        return scales

    @property
    def time_scales(self) -> list[int]:
        """Number of frames of every level over the core's, highest first (video)."""
        ratios = self.temporal_ratios or [1] * (self.num_levels - 1)
        scales = [1]
        for ratio in reversed(ratios):
            scales.insert(0, scales[0] * ratio)
        return scales

    @property
    def sizes(self) -> list[int]:
        return [self.image_size * s // self.scales[0] for s in self.scales]

    @property
    def frames(self) -> list[int]:
        return [self.num_frames * s // self.time_scales[0] for s in self.time_scales] if self.num_frames else []

    def level_shapes(self, images: bool = False) -> list[tuple[int, ...]]:
        """Per-sample shape of every level, highest first: (C, S_r, S_r), or for a video model
        (C, T_r, S_r, S_r) unless `images` (a video model trained on single frames). The one place level
        shapes are computed (training noise, sampling noise, previews, benchmarks)."""
        from matryoshka.pyramid import level_shapes

        if self.num_frames and not images:
            top = (self.in_channels, self.num_frames, self.image_size, self.image_size)
            return level_shapes(top, self.scales, self.time_scales)
        return level_shapes((self.in_channels, self.image_size, self.image_size), self.scales)

    def innermost(self, num_levels: int) -> ModelConfig:
        """The config of the model made of the innermost `num_levels` levels (a progressive stage)."""
        if not 1 <= num_levels <= self.num_levels:
            raise ConfigError("levels", f"a stage must use 1..{self.num_levels} levels, got {num_levels}")
        drop = self.num_levels - num_levels
        ratios = self.temporal_ratios[drop:] if self.temporal_ratios else None
        return dataclasses.replace(
            self,
            levels=[copy.deepcopy(level) for level in self.levels[drop:]],
            image_size=self.sizes[drop],
            num_frames=self.frames[drop] if self.num_frames else 0,
            temporal_ratios=ratios if ratios else None,
        )

    def validate(self) -> None:
        require(len(self.levels) >= 1, "levels", "needs at least one level")
        for i, level in enumerate(self.levels):  # again here: configs built in Python skip from_dict
            try:
                level.validate()
            except ConfigError as err:
                raise ConfigError(f"levels[{i}].{err.path}", str(err).split(": ", 1)[1]) from None
        require(self.in_channels >= 1, "in_channels", "must be >= 1")
        total = math.prod(level.downsampling for level in self.levels)
        require(
            self.image_size > 0 and self.image_size % total == 0,
            "image_size",
            f"{self.image_size} is not divisible by the total down-sampling {total} of the nested levels "
            f"(each level halves its side len(channels) - 1 times)",
        )
        conditioned = self.text_dim > 0 or self.num_classes > 0 or any(
            lv.micro_conditioning for lv in self.levels[:-1]
        )
        if conditioned:
            core_width = self.levels[-1].time_embedding_dim
            for i, level in enumerate(self.levels):
                require(
                    level.time_embedding_dim == core_width,
                    f"levels[{i}].temb_dim",
                    f"time-embedding width {level.time_embedding_dim} must equal the core's {core_width}: "
                    "the conditioning embedding is shared by all levels",
                )
        if self.num_frames:
            ratios = self.temporal_ratios or [1] * (self.num_levels - 1)
            require(len(ratios) == self.num_levels - 1, "temporal_ratios", "needs one entry per outer level")
            require(all(r >= 1 for r in ratios), "temporal_ratios", f"ratios must be >= 1, got {ratios}")
            require(
                self.num_frames % math.prod(ratios) == 0,
                "num_frames",
                f"{self.num_frames} frames are not divisible by the temporal ratios {ratios}",
            )
        else:
            if self.temporal_ratios is not None:
                raise ConfigError("temporal_ratios", "only applies to video models (num_frames > 0)")
            for i, level in enumerate(self.levels):
                require(
                    not level.temporal_attention_layers or not any(level.temporal_attention_layers),
                    f"levels[{i}].temporal_attention_layers",
                    "temporal layers need a video model (num_frames > 0)",
                )
                require(not level.temporal_conv, f"levels[{i}].temporal_conv",
                        "temporal layers need a video model (num_frames > 0)")
