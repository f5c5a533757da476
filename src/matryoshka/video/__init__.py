"""Text-to-video: datasets of clips, inflating image models, motion measurement and video files.

Clips are float tensors (C, T, H, W) in [-1, 1]; batches (B, C, T, H, W), the layout NestedUNet takes
for video. This package imports nothing from training, CLI or demo code.
"""

from .datasets import VideoFolderDataset, VideoShardDataset
from .decoding import VIDEO_EXTENSIONS, count_frames, decode_clip, frame_indices, read_video
from .inflation import (
    freeze_all_but_temporal,
    image_counterpart,
    inflate_image_model,
    load_image_weights,
    temporal_parameters,
)
from .io import level_video_path, mp4_codec, save_video, save_video_levels, tile_videos, video_to_frames
from .moving_fashion_mnist import (
    DIRECTION_PHRASES,
    DIRECTIONS,
    MOTION_TEMPLATES,
    MovingFashionMNIST,
    all_motion_captions,
    direction_index,
    directions_named_in,
    motion_caption,
    render_clip,
)

__all__ = [
    "DIRECTIONS",
    "DIRECTION_PHRASES",
    "MOTION_TEMPLATES",
    "VIDEO_EXTENSIONS",
    "MovingFashionMNIST",
    "VideoFolderDataset",
    "VideoShardDataset",
    "all_motion_captions",
    "count_frames",
    "decode_clip",
    "direction_index",
    "directions_named_in",
    "frame_indices",
    "image_counterpart",
    "inflate_image_model",
    "level_video_path",
    "load_image_weights",
    "motion_caption",
    "mp4_codec",
    "read_video",
    "render_clip",
    "save_video",
    "save_video_levels",
    "temporal_parameters",
    "freeze_all_but_temporal",
    "tile_videos",
    "video_to_frames",
]
