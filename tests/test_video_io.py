"""Writing videos: GIF and MP4 round trips (decoded back with PyAV), grids, every pyramid level."""

from __future__ import annotations

import av
import pytest
import torch
from PIL import Image

from matryoshka.video import MovingFashionMNIST, mp4_codec, read_video, save_video, save_video_levels, tile_videos
from matryoshka.video.motion import centroid_motion


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return MovingFashionMNIST("test", num_frames=8, image_size=32, length=4)[1]["video"]  # moving right


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_round_trip_keeps_frames_and_motion(tmp_path, clip, suffix):
    path = save_video(clip, tmp_path / f"clip{suffix}", fps=8)
    back = read_video(path, channels=1)
    assert back.shape == clip.shape  # every frame comes back, at its size
    tolerance = 0.01 if suffix == ".gif" else 0.12  # GIF is lossless for gray; H.264 is not
    assert (back - clip).abs().mean() < tolerance
    torch.testing.assert_close(centroid_motion(back[None]), centroid_motion(clip[None]), rtol=0, atol=0.1)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        seconds = float(stream.duration * stream.time_base) if stream.duration else float(container.duration) / 1e6
        assert seconds == pytest.approx(1.0, abs=0.1)  # 8 frames at 8 fps


def test_mp4_codec_and_upscaled_odd_sized_rgb(tmp_path):
    assert mp4_codec() in ("libx264", "h264", "mpeg4")
    video = torch.rand(3, 5, 7, 9) * 2 - 1  # odd sides: padded for 4:2:0 chroma
    back = read_video(save_video(video, tmp_path / "odd.mp4", fps=12, upscale=2))
    assert back.shape == (3, 5, 14 + 0, 18 + 0)


def test_mpeg4_fallback_encoder_works(tmp_path, clip):
    back = read_video(save_video(clip, tmp_path / "m.mp4", fps=8, codec="mpeg4"), channels=1)
    assert back.shape == clip.shape and (back - clip).abs().mean() < 0.15


def test_bad_requests_name_the_problem(tmp_path, clip):
    with pytest.raises(ValueError, match="suffix"):
        save_video(clip, tmp_path / "clip.avi")
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        save_video(clip[0], tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="fps"):
        save_video(clip, tmp_path / "clip.gif", fps=0)


def test_levels_and_grids(tmp_path, clip):
    batch = torch.stack([clip, clip.flip(-1)])  # (2, 1, 8, 32, 32)
    grid = tile_videos(batch, nrow=2, padding=2)
    assert grid.shape == (1, 8, 36, 70)
    low = torch.nn.functional.avg_pool2d(batch[:, :, ::4].flatten(1, 2), 2).reshape(2, 1, 2, 16, 16)
    paths = save_video_levels([batch, low], tmp_path / "sample.gif", fps=8)
    assert [p.name for p in paths] == ["sample.level0.gif", "sample.level1.gif"]
    top, bottom = read_video(paths[0], 1), read_video(paths[1], 1)
    assert top.shape == (1, 8, 36, 70) and bottom.shape == (1, 2, 36, 70)  # enlarged to the top size
    for gif, milliseconds in ((paths[0], 125), (paths[1], 500)):  # 2 frames at 2 fps last as long as 8 at 8
        with Image.open(gif) as image:
            assert abs(image.info["duration"] - milliseconds) <= 10
