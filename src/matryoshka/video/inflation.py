"""Inflating a trained image NestedUNet into a video NestedUNet (the paper starts its video model so).

The video model's spatial layers have the image model's names and shapes (frames are folded into the
batch), so the image weights load by name; what the image model lacks are the temporal layers
(`t_layers`), which start as exact identities (zero-initialised outputs, and skipped for one frame), the
frame-index embeddings (`frame_emb`, zero-initialised outputs, none for one frame), and
any outer video levels, whose adapters start at zero. Hence, before any video training:

- with the same frames at every level (temporal_ratios all 1), each frame of the inflated model's output
  equals the image model's output for that frame, at every level the image model has;
- with temporal nesting (level r + 1 keeps every k-th frame of level r), the inner level's frame j is
  the image model's inner output for the pair (outer frame j k, inner frame j), the key frames of the
  outer level (0, k, 2k, ...) equal the image model's outer output exactly, and the other outer frames
  see the inner features of the key frame that starts their group (see models/unet.py `_to_outer_frames`);
- a video model with more levels than the image model (e.g. 16x256 over 16x64 over a 64x64 image model)
  takes the image model as its innermost levels; the new outer levels start untrained, with zero
  adapters, so the inner levels behave as above.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch

from matryoshka.models import ModelConfig, NestedUNet

TEMPORAL_PARAMETER_MARK = "t_layers."
# Everything an image model lacks: the temporal layers and the frame-index embeddings.
VIDEO_ONLY_MARKS = (TEMPORAL_PARAMETER_MARK, "frame_emb.")


def image_counterpart(video_config: ModelConfig, num_levels: int | None = None) -> ModelConfig:
    """The image model a video config is inflated from: its innermost `num_levels` levels (default all)
    without frames, temporal ratios or temporal layers (the stage-1 config of progressive training)."""
    config = video_config.innermost(num_levels or video_config.num_levels)
    levels = [
        dataclasses.replace(
            copy.deepcopy(level), temporal_attention_layers=None, temporal_conv=False, temporal_conv_space=1,
            frame_embedding=False,
        )
        for level in config.levels
    ]
    return dataclasses.replace(config, levels=levels, num_frames=0, temporal_ratios=None)


def _load_image_model(image_model: NestedUNet | str | os.PathLike[str]) -> NestedUNet:
    if isinstance(image_model, NestedUNet):
        return image_model
    from matryoshka.model_dir import load_model_dir  # file I/O only when given a directory

    model, _ = load_model_dir(Path(image_model))
    return model


def _check_compatible(image: ModelConfig, video: ModelConfig) -> int:
    """Raise ValueError naming what differs; return the depth at which the image model sits."""
    if video.num_frames <= 0:
        raise ValueError("the target config is not a video model (num_frames must be > 0)")
    if image.num_frames:
        raise ValueError(f"the model to inflate is already a video model (num_frames = {image.num_frames})")
    if image.num_levels > video.num_levels:
        raise ValueError(
            f"the image model has {image.num_levels} levels but the video model only {video.num_levels}: "
            "an image model becomes the innermost levels of the video model"
        )
    depth = video.num_levels - image.num_levels
    for field in ("in_channels", "output_channels", "text_dim", "text_proj_dim", "pooled_text",
                  "masked_cross_attention", "num_text_head_layers", "num_classes"):
        if getattr(image, field) != getattr(video, field):
            raise ValueError(
                f"model.{field} differs: the image model has {getattr(image, field)!r}, "
                f"the video config {getattr(video, field)!r}"
            )
    if video.sizes[depth] != image.image_size:
        raise ValueError(
            f"the image model works at {image.image_size}x{image.image_size} but the video model's level {depth} "
            f"(where it goes) is {video.sizes[depth]}x{video.sizes[depth]}"
        )
    stripped = image_counterpart(video, image.num_levels)
    for i, (mine, theirs) in enumerate(zip(image.levels, stripped.levels, strict=True)):
        if dataclasses.asdict(mine) != dataclasses.asdict(theirs):
            diff = {
                k: (v, getattr(theirs, k)) for k, v in dataclasses.asdict(mine).items() if getattr(theirs, k) != v
            }
            raise ValueError(
                f"image level {i} differs from video level {depth + i} beyond temporal layers: "
                + ", ".join(f"{k}: image {a!r} vs video {b!r}" for k, (a, b) in diff.items())
            )
    return depth


def inflate_image_model(
    image_model: NestedUNet | str | os.PathLike[str], video_config: ModelConfig
) -> NestedUNet:
    """A new video NestedUNet for `video_config` holding the image model's weights (a model or a model
    directory) in its innermost levels; temporal layers and new outer levels start as described in the
    module docstring. The image model is not modified."""
    image = _load_image_model(image_model)
    video_config.validate()
    _check_compatible(image.config, video_config)
    video = NestedUNet(video_config)
    load_image_weights(video, image)
    parameter = next(image.parameters(), None)
    if parameter is not None:
        video = video.to(device=parameter.device)
    return video.train(image.training)


def load_image_weights(video: NestedUNet, image: NestedUNet) -> None:
    """Copy an image model's weights into the innermost levels of an existing video model, in place
    (the video model's temporal layers and extra outer levels keep their values). ValueError if they
    do not fit (the message names what differs)."""
    depth = _check_compatible(image.config, video.config)
    target = video
    for _ in range(depth):
        target = target.inner_unet
    state = {k: v.detach().clone() for k, v in image.state_dict().items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    not_temporal = [k for k in missing if not any(mark in k for mark in VIDEO_ONLY_MARKS)]
    if not_temporal or unexpected:
        raise ValueError(
            "the image weights do not fit the video model: "
            f"missing {not_temporal[:5]}{'...' if len(not_temporal) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def temporal_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of the temporal layers and frame embeddings, which an image model does not have
    (for freezing the rest, or a separate learning rate)."""
    return [p for name, p in model.named_parameters() if any(mark in name for mark in VIDEO_ONLY_MARKS)]


def freeze_all_but_temporal(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Leave only `temporal_parameters(model)` trainable (requires_grad); returns them (empty: the model
    has no temporal layers, and nothing is left trainable)."""
    temporal = temporal_parameters(model)
    kept = {id(p) for p in temporal}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in kept)
    return temporal
