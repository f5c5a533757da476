"""`matryoshka eval` for a text-to-video model: frame FID/KID, motion accuracy, consistency, report and plot."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import random_model
from matryoshka import cli
from matryoshka.conditioning.testing import make_tiny_t5
from matryoshka.diffusion import DiffusionConfig
from matryoshka.evaluation.video import frame_consistency
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_frame_consistency_of_frozen_moving_and_noisy_clips():
    frozen = torch.rand(2, 1, 1, 8, 8).expand(2, 1, 4, 8, 8)
    assert frame_consistency(frozen) == pytest.approx(1.0)
    assert abs(frame_consistency(torch.randn(2, 1, 4, 8, 8))) < 0.3


def test_eval_scores_a_text_to_video_model(tmp_path, capsys):
    t5 = make_tiny_t5(tmp_path / "t5")
    levels = [LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32, temporal_conv=True),
              LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32,
                          temporal_attention_layers=[1, 1])]
    config = ModelConfig(levels=levels, image_size=16, in_channels=1, text_dim=32, num_frames=4, temporal_ratios=[1])
    model_dir = save_model_dir(tmp_path / "model", random_model(config, scale=0.05),
                               MDMConfig(model=config, diffusion=DiffusionConfig(), text_encoder=f"t5:{t5}"))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--num-samples", "8", "--num-reference", "8", "--steps", "2",
            "--kid-subsets", "2", "--kid-subset-size", "8", "--motion-classifier-steps", "20",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["num_clips"] == 8 and report["frame_fid"] > 0
    floor = report["real_floor"]  # 8 real training clips: what a perfect model would score
    assert floor["clips"] == 8 and 0 < floor["frame_fid"] < report["frame_fid"]
    motion = report["motion"]
    assert set(motion["per_direction"]) == {"left", "right", "up", "down"}
    assert 0 <= motion["direction_accuracy"] <= 1 and motion["chance"] == 0.25
    assert motion["still_copies"]["still"] >= 0 and 0 < report["consistency"]["real"] < 1
    assert (out / "samples.gif").is_file() and (out / "per_direction_accuracy.png").is_file()
    assert "frame FID" in (printed := capsys.readouterr().out) and "real clips" in printed
