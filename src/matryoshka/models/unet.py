"""NestedUNet: a UNet band around an inner NestedUNet, down to a core UNet (REFERENCE.md section 5).

One class serves every depth: a band built from `config.levels[depth]` owns its down path, up path
and output layer; if more levels follow it owns `inner_unet` (the next band) and two zero-initialised
adapters. The outer down path runs until it reaches the inner band's resolution; `in_adapter` hands
those features to the inner band, which adds them to `conv_in(x_low)`; the inner band's last feature
map comes back through `out_adapter` and joins the outer up path. At initialisation both adapters are
zero, so a freshly nested outer band leaves the trained inner band exactly as it was.

The core (last band) also owns the conditioning layers (text projection, pooled-text embedding,
text-head layers), as in ml-mdm, so official state dicts load by name.

Video: every band folds its frames into the batch, (B * T_r, C, H, W), so all spatial layers treat
frames as independent images and only the temporal layers (TemporalConv, TemporalAttention) mix them.
With temporal nesting (temporal_ratios) the inner band has k times fewer frames: it gets the features
of every k-th outer frame and hands its features back held over each group of k frames
(`_to_inner_frames`, `_to_outer_frames`). An image pyramid given to a video model is denoised as
images (temporal layers skip single frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from matryoshka.models.config import LevelConfig, ModelConfig
from matryoshka.models.layers import (
    GroupNorm,
    Linear,
    ResNetBlock,
    SinusoidalEmbedding,
    TextHeadLayer,
    zero_init,
)


class NestedUNet(nn.Module):
    """The denoiser of a whole pyramid.

    forward(pyramid, t, ...) takes the noisy levels highest first, images (B_r, C, H_r, W_r) or videos
    (B_r, C, T_r, H_r, W_r), and returns one prediction per level in the same layout. B_r may shrink
    towards the top (mixed-resolution batches: only the leading rows carry the high levels).
    """

    def __init__(self, config: ModelConfig, depth: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.depth = depth
        level: LevelConfig = config.levels[depth]
        self.level = level
        self.is_core = depth == config.num_levels - 1
        temb_dim = level.time_embedding_dim
        cond_dim = config.cond_dim
        attention_groups = level.attention_norm_groups or level.norm_groups

        # Time embedding (and micro-conditioning, each its own small MLP on a sinusoid).
        self.time_features = SinusoidalEmbedding(temb_dim)
        self.temb_layer1 = Linear(temb_dim // 4, temb_dim)
        self.temb_layer2 = Linear(temb_dim, temb_dim)
        self.micro_defaults = dict(level.micro_conditioning)
        if self.micro_defaults:
            self.cond_layers = nn.ModuleDict(
                {
                    name: nn.ModuleList(
                        [Linear(temb_dim // 4, temb_dim), zero_init(Linear(temb_dim, temb_dim))]
                    )
                    for name in self.micro_defaults
                }
            )

        if level.frame_embedding:
            self.frame_emb = nn.ModuleList(
                [Linear(temb_dim // 4, temb_dim), zero_init(Linear(temb_dim, temb_dim))]
            )

        # Conditioning layers live in the core (ml-mdm's layout); class labels in the outermost band.
        if self.is_core and config.text_dim > 0:
            if config.text_proj_dim > 0:
                self.lm_proj = Linear(config.text_dim, config.text_proj_dim)
            self.lm_head = nn.ModuleList(TextHeadLayer(cond_dim) for _ in range(config.num_text_head_layers))
            if config.pooled_text:
                self.cond_emb = Linear(cond_dim, temb_dim, bias=False)
        if self.is_core and config.num_classes > 0:
            # Index num_classes is the null label used for classifier-free guidance. It lives in the
            # core, like the text layers, so that nesting a trained model only prefixes its names.
            self.label_emb = nn.Embedding(config.num_classes + 1, temb_dim)

        # Down path: conv_in, then one block per resolution; remember the width of every skip.
        width = level.channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, width, 3, padding=1)
        skip_widths = [width]
        last = len(level.channels) - 1
        blocks = []
        for i, out_width in enumerate(level.channels):
            in_out = []
            for _ in range(level.num_res_blocks[i]):
                in_out.append((width, out_width))
                width = out_width
                skip_widths.append(width)
            if i != last:
                skip_widths.append(width)
            blocks.append(self._block(in_out, level, i, cond_dim, attention_groups, "down" if i != last else None))
        self.down_blocks = nn.ModuleList(blocks)

        if level.mid_block:
            self.mid_blocks = nn.ModuleList(
                [
                    ResNetBlock(
                        [(width, width)], temb_dim, level.norm_groups, level.dropout, 1, level.num_heads,
                        attention_groups, cond_dim, level.attention_ffn,
                    ),
                    ResNetBlock([(width, width)], temb_dim, level.norm_groups, level.dropout),
                ]
            )

        # Up path: one more ResNet per resolution than the down path, each eating one skip.
        blocks = []
        for i in reversed(range(len(level.channels))):
            in_out = []
            for _ in range(level.num_res_blocks[i] + 1):
                in_out.append((width + skip_widths.pop(), level.channels[i]))
                width = level.channels[i]
            blocks.append(self._block(in_out, level, i, cond_dim, attention_groups, "up" if i != 0 else None))
        self.up_blocks = nn.ModuleList(blocks)

        self.norm_out = GroupNorm(level.norm_groups, width)
        self.conv_out = zero_init(nn.Conv2d(width, config.output_channels, 3, padding=1))

        if not self.is_core:
            inner_width = config.levels[depth + 1].channels[0]
            self.inner_unet = NestedUNet(config, depth + 1)
            self.in_adapter = (
                zero_init(nn.Conv2d(level.channels[-1], inner_width, 3, padding=1)) if level.inner_input else None
            )
            self.out_adapter = zero_init(nn.Conv2d(inner_width, level.channels[-1], 3, padding=1))

    def _block(self, in_out, level: LevelConfig, i: int, cond_dim: int, attention_groups: int, resample):
        return ResNetBlock(
            in_out,
            level.time_embedding_dim,
            level.norm_groups,
            level.dropout,
            attention_layers=level.attention_at(i),
            num_heads=level.num_heads,
            attention_groups=attention_groups,
            cond_dim=cond_dim if level.attention_at(i) else 0,
            ffn=level.attention_ffn,
            resample=resample,
            temporal_attention_layers=level.temporal_at(i),
            temporal_conv=level.temporal_conv,
            temporal_conv_space=level.temporal_conv_space,
        )

    # ----------------------------------------------------------------------------------------------
    # Embeddings
    def _sinusoid_mlp(self, values: torch.Tensor, layers: tuple[nn.Module, nn.Module]) -> torch.Tensor:
        features = self.time_features.features(values).to(layers[0].weight.dtype)  # a network cast to bf16/fp16
        return layers[1](F.silu(layers[0](features)))

    def time_embedding(self, t: torch.Tensor, micros: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """t (B,) -> (B, temb): the time step's embedding plus this band's micro-conditioning."""
        temb = self._sinusoid_mlp(t, (self.temb_layer1, self.temb_layer2))
        for name, default in self.micro_defaults.items():
            value = (micros or {}).get(name)
            value = torch.full_like(t, default, dtype=torch.float32) if value is None else value.float()
            # "scale" is capped at its default (ml-mdm); other values are multiplied by 1000.
            value = (value / default).clamp(max=1) * default if name == "scale" else value * 1000
            temb = temb + self._sinusoid_mlp(value, self.cond_layers[name])
        return temb

    def encode_conditioning(
        self, states: torch.Tensor | None, mask: torch.Tensor | None, labels: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Text states (B, S, text_dim), mask (B, S), labels (B,) -> (embedding added to every level's
        time embedding (B, temb), text states for cross-attention, mask for cross-attention)."""
        if not self.is_core:
            return self.inner_unet.encode_conditioning(states, mask, labels, batch)
        cond_emb, states, mask = self._encode_text(states, mask)
        if self.config.num_classes > 0:
            if labels is None:
                device = self.conv_in.weight.device
                labels = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
            label_emb = self.label_emb(labels)
            cond_emb = label_emb if cond_emb is None else cond_emb + label_emb
        return cond_emb, states, mask

    def _encode_text(self, states: torch.Tensor | None, mask: torch.Tensor | None):
        if self.config.text_dim <= 0 or states is None:
            return None, None, None
        if self.config.text_proj_dim > 0:
            states = self.lm_proj(states)
        masked = self.config.masked_cross_attention
        for layer in self.lm_head:
            states = layer(states, mask if masked else None)
        if mask is None or (not masked and len(self.lm_head) > 0):
            pooled = states.mean(dim=1)
        else:
            mask_f = mask.to(states.dtype)
            pooled = (mask_f.unsqueeze(-1) * states).sum(dim=1) / mask_f.sum(dim=1, keepdim=True).clamp(min=1)
        cond_emb = self.cond_emb(pooled) if self.config.pooled_text else None
        return cond_emb, states, mask if masked else None

    # ----------------------------------------------------------------------------------------------
    # Forward
    def forward(
        self,
        pyramid: list[torch.Tensor],
        t: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        micros: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """pyramid: R noisy levels, highest first; t: (B,) int time steps given to the network
        (B = rows of the base level); text_states (B, S, text_dim) and text_mask (B, S) or None;
        labels (B,) int with num_classes meaning "no label", or None. Returns R predictions."""
        if len(pyramid) != self.config.num_levels:
            raise ValueError(f"the model has {self.config.num_levels} levels, got a pyramid of {len(pyramid)}")
        cond_emb, states, mask = self.encode_conditioning(text_states, text_mask, labels, t.shape[0])
        is_video = pyramid[0].ndim == 5
        frames = [x.shape[2] for x in pyramid] if is_video else [1] * len(pyramid)
        self._check_frames(pyramid, frames)
        levels = [_fold_frames(x) for x in pyramid]
        outputs, _ = self._denoise(levels, frames, t, cond_emb, states, mask, micros, None)
        if is_video:
            outputs = [_unfold_frames(o, f) for o, f in zip(outputs, frames, strict=True)]
        return outputs

    def set_gradient_checkpointing(self, enabled: bool = True, outer_only: bool = True) -> None:
        """Recompute block activations in the backward pass instead of storing them.

        outer_only: only the high-resolution outer bands, whose activations dominate memory, while
        the small core keeps its speed.
        """
        self.gradient_checkpointing = enabled and not (outer_only and self.is_core)
        if not self.is_core:
            self.inner_unet.set_gradient_checkpointing(enabled, outer_only)

    def _run(self, block, x, temb, states, mask, skips, num_frames):
        """One block, under activation checkpointing when enabled and training."""
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            run = _checkpointed(block, states, mask, skips is not None, num_frames)
            return checkpoint(run, x, temb, *(skips or []), use_reentrant=False)
        return block(x, temb, states, mask, skips=None if skips is None else list(skips), num_frames=num_frames)

    def _check_frames(self, pyramid: list[torch.Tensor], frames: list[int]) -> None:
        """Every level has the same layout, and level r + 1 has temporal_ratios[r] times fewer frames."""
        if any(x.ndim != pyramid[0].ndim or x.ndim not in (4, 5) for x in pyramid):
            raise ValueError(
                "pyramid levels must all be images (B, C, H, W) or all videos (B, C, T, H, W), got shapes "
                f"{[tuple(x.shape) for x in pyramid]}"
            )
        if pyramid[0].ndim == 4:
            return  # images: every level is one frame (temporal layers pass them through)
        time_scales = self.config.time_scales
        for r in range(1, len(frames)):
            ratio = time_scales[r - 1] // time_scales[r]
            if frames[r - 1] != frames[r] * ratio:
                raise ValueError(
                    f"pyramid level {r} has {frames[r]} frames and level {r - 1} has {frames[r - 1]}, but the "
                    f"model's temporal ratio there is {ratio} (level {r - 1} must have {ratio} x {frames[r]} "
                    "frames; build the pyramid with pyramid.build_pyramid(x, config.scales, config.time_scales))"
                )

    def _denoise(self, levels, frames, t, cond_emb, states, mask, micros, features):
        """Run this band (and its inner bands) on folded levels; returns (predictions, last features)."""
        x_t = levels[0]
        num_frames = frames[0]
        temb = self.time_embedding(t, micros)
        if cond_emb is not None:
            temb = temb + cond_emb
        rows = x_t.shape[0] // num_frames  # samples carrying this level
        temb_here = temb[:rows]
        if self.level.frame_embedding and num_frames > 1:
            # One embedding per folded row (sample-major, as _fold_frames lays them out): (rows * T, D).
            index = torch.arange(num_frames, device=temb.device)
            per_frame = self._sinusoid_mlp(index, self.frame_emb).to(temb.dtype)
            temb_here = (temb_here[:, None, :] + per_frame[None]).reshape(rows * num_frames, -1)
        states_here = None if states is None else states[:rows]
        mask_here = None if mask is None else mask[:rows]

        if self.level.normalize_input and not self.is_core:
            x_t = x_t / x_t.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        x = self.conv_in(x_t)
        if features is not None:
            x = x + features

        skips = [x]
        for block in self.down_blocks:
            x, activations = self._run(block, x, temb_here, states_here, mask_here, None, num_frames)
            skips.extend(activations)

        if self.is_core:
            if self.level.mid_block:
                x, _ = self.mid_blocks[0](x, temb_here, states_here, mask_here, num_frames=num_frames)
                x, _ = self.mid_blocks[1](x, temb_here, num_frames=num_frames)
            inner_outputs = []
        else:
            inner_rows = levels[1].shape[0] // frames[1]
            handed = None
            if self.in_adapter is not None:
                handed = _to_inner_frames(self.in_adapter(x), num_frames, frames[1])
                if inner_rows > rows:  # mixed batch: rows without this level get no features
                    handed = torch.cat([handed, handed.new_zeros(
                        (inner_rows - rows) * frames[1], *handed.shape[1:])])
            inner_outputs, inner_features = self.inner_unet._denoise(
                levels[1:], frames[1:], t, cond_emb, states, mask, micros, handed
            )
            back = _to_outer_frames(self.out_adapter(inner_features)[: rows * frames[1]], frames[1], num_frames)
            x = x + back

        for block in self.up_blocks:
            taken = len(block.resnets)
            block_skips, skips = skips[-taken:], skips[:-taken]
            x, _ = self._run(block, x, temb_here, states_here, mask_here, block_skips, num_frames)

        out = self.conv_out(F.silu(self.norm_out(x)))
        return [out, *inner_outputs], x


def _checkpointed(block, states, mask, has_skips, num_frames):
    def run(x, temb, *skips):
        return block(x, temb, states, mask, skips=list(skips) if has_skips else None, num_frames=num_frames)

    return run


def _fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B * T, C, H, W); images pass through."""
    if x.ndim == 4:
        return x
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n // num_frames, num_frames, c, h, w).transpose(1, 2)


def _to_inner_frames(x: torch.Tensor, outer_frames: int, inner_frames: int) -> torch.Tensor:
    """Outer features (B * T_out, C, H, W) -> the inner band's frames (B * T_in, C, H, W).

    Inner frame j is outer frame j * k (k = T_out / T_in), exactly as `pyramid.downsample` keeps every
    k-th frame, so each inner frame receives the features of the very frame it is a low-resolution copy
    of (averaging k frames would hand it a blend of frames it never sees)."""
    if outer_frames == inner_frames:
        return x
    n, c, h, w = x.shape
    step = outer_frames // inner_frames
    return x.reshape(n // outer_frames, outer_frames, c, h, w)[:, ::step].reshape(-1, c, h, w)


def _to_outer_frames(x: torch.Tensor, inner_frames: int, outer_frames: int) -> torch.Tensor:
    """Inner features (B * T_in, C, H, W) -> outer frames (B * T_out, C, H, W), each held for k frames.

    Outer frames j * k .. j * k + k - 1 all receive inner frame j, the key frame that starts their group
    (sample-and-hold; with one inner frame, as in the paper's 16-frames-over-1-image nesting, every
    frame receives it). The outer band's temporal layers learn to move from there; the out_adapter
    starts at zero, so at inflation the key frames match the image model exactly and the other frames
    see the image model's inner features of their group's key frame."""
    if outer_frames == inner_frames:
        return x
    n, c, h, w = x.shape
    step = outer_frames // inner_frames
    return (
        x.reshape(n // inner_frames, inner_frames, 1, c, h, w)
        .expand(-1, -1, step, -1, -1, -1)
        .reshape(-1, c, h, w)
    )


__all__ = ["NestedUNet"]
