"""Motion measurement: the centroid tracker and the motion classifier (shapes, still class, save/load)."""

from __future__ import annotations

import pytest
import torch

from matryoshka.video import MovingFashionMNIST
from matryoshka.video.motion import (
    STILL,
    MotionClassifier,
    centroid_directions,
    centroid_motion,
    load_motion_classifier,
    predict_directions,
    save_motion_classifier,
    train_motion_classifier,
)


def test_centroid_follows_a_square():
    clips = torch.full((2, 1, 5, 16, 16), -1.0)
    for t in range(5):
        clips[0, :, t, 4:8, 2 + t : 6 + t] = 1.0  # moving right, 1 px per frame
        clips[1, :, t, 8 - t : 12 - t, 4:8] = 1.0  # moving up
    velocity = centroid_motion(clips)
    torch.testing.assert_close(velocity, torch.tensor([[1.0, 0.0], [0.0, -1.0]]), rtol=0, atol=1e-5)
    assert centroid_directions(clips).tolist() == [1, 2]


def test_classifier_learns_the_still_class_and_round_trips(tmp_path):
    data = MovingFashionMNIST("test", num_frames=4, image_size=16, item_size=8, length=64)
    model = train_motion_classifier(data, steps=15, batch_size=16, width=4, still_fraction=1.0, lr=1e-2)
    clips = torch.stack([data[i]["video"] for i in range(8)])
    assert model(clips).shape == (8, 5)
    assert (predict_directions(model, clips) == STILL).all()  # it only ever saw still clips
    loaded = load_motion_classifier(save_motion_classifier(model, tmp_path / "motion"))
    assert torch.equal(loaded(clips), model(clips))
    with pytest.raises(ValueError, match="T >= 2"):
        MotionClassifier()(clips[:, :, :1])
    with pytest.raises(FileNotFoundError, match="motion classifier"):
        load_motion_classifier(tmp_path)
