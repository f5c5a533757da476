"""Training compute as the study harness and the video-inflation comparison count it."""

from __future__ import annotations

import dataclasses

from matryoshka.training import load_train_config
from matryoshka.training.flops import training_step_flops


def test_a_step_costs_what_its_stage_computes():
    video = load_train_config("configs/video_tiny.yaml")
    frames, clips, nested = (training_step_flops(video, i) for i in range(3))
    # stage 1: 32 single 16 px frames; stage 2: 8 clips of 8 such frames (64 frames + temporal layers);
    # stage 3: the same clips with the 32 px band on top
    assert 2 * frames < clips < nested
    temporal_only = dataclasses.replace(video, stages=[dataclasses.replace(video.stages[2], trainable="temporal")])
    frozen = training_step_flops(temporal_only, 0)
    assert 0.7 * nested < frozen < nested  # the frozen layers' weight gradients are skipped, nothing else


def test_the_image_study_budget_is_unchanged():
    config = load_train_config("configs/study/nested32.yaml")
    flops = training_step_flops(config, 0)
    assert 22.8e9 < flops < 23.0e9  # 150 TFLOP = 6,550 steps of arm (c) in study32 (configs/study/study32.yaml)
