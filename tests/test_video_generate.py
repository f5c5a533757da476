"""Sampling video models: MatryoshkaPipeline gives clips at every level, `matryoshka generate` writes GIF/MP4."""

from __future__ import annotations

import pytest
import torch

from matryoshka import cli
from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.video import read_video


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    """4 frames of 16 px over 2 frames of 8 px, class-conditional, random (non-zero) weights."""
    outer = LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32, temporal_conv=True)
    core = LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32,
                       temporal_attention_layers=[1, 1])
    config = ModelConfig(levels=[outer, core], image_size=16, in_channels=1, num_classes=3, num_frames=4,
                         temporal_ratios=[2])
    torch.manual_seed(0)
    model = NestedUNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("video") / "model"
    save_model_dir(directory, model, MDMConfig(model=config, diffusion=DiffusionConfig()))
    return directory


def test_pipeline_samples_clips_at_every_level(video_model_dir):
    pipe = MatryoshkaPipeline.from_pretrained(video_model_dir)
    assert pipe.is_video and pipe.level_shapes() == [(1, 4, 16, 16), (1, 2, 8, 8)]
    out = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, generator=7, output_levels=True,
               progress=False)
    assert [tuple(t.shape) for t in out.tensors] == [(2, 1, 4, 16, 16), (2, 1, 2, 8, 8)]
    assert out.images[0].size == (4 * 16, 16)  # the frames side by side
    assert out.levels is not None and out.levels[1][0].size == (2 * 8, 8)
    again = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, generator=7, progress=False)
    assert torch.equal(again.tensors[0], out.tensors[0])
    unguided = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=1.0, generator=7, progress=False)
    assert not torch.equal(unguided.tensors[0], out.tensors[0])


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_generate_writes_videos_and_levels(video_model_dir, tmp_path, suffix, capsys):
    out = tmp_path / f"clip{suffix}"
    code = cli.main(["generate", "--model", str(video_model_dir), "--class", "1", "--steps", "2", "--seed", "3",
                     "--num-images", "2", "--all-levels", "--fps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    top = read_video(out, channels=1)
    assert top.shape[1] == 4 and top.shape[3] > 2 * 16  # 4 frames, 2 clips side by side
    assert read_video(tmp_path / f"clip.level0{suffix}", channels=1).shape[1] == 4
    assert read_video(tmp_path / f"clip.level1{suffix}", channels=1).shape[1] == 2
    assert "2 video(s)" in capsys.readouterr().out


def test_generate_refuses_an_image_file_for_a_video_model(video_model_dir, tmp_path, capsys):
    code = cli.main(["generate", "--model", str(video_model_dir), "--class", "1", "--steps", "1", "--quiet",
                     "--out", str(tmp_path / "clip.png")])
    assert code == 2 and ".gif or .mp4" in capsys.readouterr().err
