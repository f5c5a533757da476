"""The text-to-video model that ships inside the package ("fashion-t2v"): reachable by name, one
command writes its clips (GIF and MP4, every level), and its weights know which way a caption moves."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka import cli, pyramid
from matryoshka.model_dir import bundled_models
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.video.motion import centroid_track
from matryoshka.video.moving_fashion_mnist import DIRECTIONS


@pytest.fixture(scope="module")
def pipe() -> MatryoshkaPipeline:
    return MatryoshkaPipeline.from_pretrained("fashion-t2v")


def gif_frames(path) -> list[Image.Image]:
    frames = []
    with Image.open(path) as image:
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(image.convert("L").copy())
    return frames


def test_it_is_bundled_and_recommends_its_measured_sampling_settings(pipe):
    assert "fashion-t2v" in bundled_models()
    assert pipe.config.model.num_frames == 8 and pipe.config.model.sizes == [32, 16]
    assert pipe.config.sampling.num_inference_steps == 25 and pipe.config.sampling.guidance_scale == 3.0
    assert pipe.text_encoder is not None


def test_one_command_writes_the_clip_as_gif_and_mp4_with_every_level(tmp_path):
    base = ["generate", "a sneaker sliding to the left", "--model", "fashion-t2v", "--steps", "3", "--seed", "0",
            "--quiet"]
    assert cli.main([*base, "--all-levels", "--out", str(tmp_path / "clip.gif")]) == 0
    top, core = gif_frames(tmp_path / "clip.level0.gif"), gif_frames(tmp_path / "clip.level1.gif")
    assert len(top) == len(core) == 8
    assert top[0].size == core[0].size == (32, 32)  # every level shown at the top's size
    blocks = torch.from_numpy(np.asarray(core[3], dtype=np.float32)).view(16, 2, 16, 2)
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))  # ... from 16 px frames
    assert [f.tobytes() for f in gif_frames(tmp_path / "clip.gif")] == [f.tobytes() for f in top]
    assert cli.main([*base, "--out", str(tmp_path / "clip.mp4")]) == 0
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]
    assert len(decoded) == 8 and decoded[0].shape == (32, 32)


def test_clips_are_enlarged_and_written_one_by_one_when_asked(tmp_path):
    argv = ["generate", "a bag moving up", "--model", "fashion-t2v", "--steps", "2", "--seed", "1", "--quiet",
            "--num-images", "2", "--scale", "3", "--save-each", "--all-levels", "--out", str(tmp_path / "c.gif")]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["c.0.gif", "c.0.level0.gif", "c.0.level1.gif", "c.1.gif", "c.1.level0.gif",
                     "c.1.level1.gif", "c.gif", "c.level0.gif", "c.level1.gif"]
    assert gif_frames(tmp_path / "c.0.gif")[0].size == (96, 96)
    assert gif_frames(tmp_path / "c.1.level1.gif")[0].size == (96, 96)  # the 16 px core, shown at the top's size
    assert gif_frames(tmp_path / "c.gif")[0].size == (3 * (2 * 34 + 2), 3 * 36)  # two clips side by side


def test_its_high_noise_estimate_already_moves_the_way_the_caption_says(pipe):
    """At high noise the best x0 estimate is the average clip of the caption, which drifts by the whole
    path (7 core pixels over 8 frames) in the named direction; a model that ignored the caption's
    direction (or lost its temporal layers) would drift ~0 px."""
    shapes = pipe.level_shapes()
    core = len(shapes) - 1
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(16, *shape, generator=generator) for shape in shapes]
    time = torch.full((16,), 950)
    alpha_bar = pipe.schedule.at(time[:1])[core]
    drift = {}
    for direction in DIRECTIONS:
        embedding = pipe.text_encoder([f"a bag moving {direction}"])
        with torch.no_grad():
            prediction = pipe.model(noise, time, text_states=embedding.states.expand(16, -1, -1),
                                    text_mask=embedding.mask.expand(16, -1))[core]
        x0 = pyramid.convert(noise[core], prediction, alpha_bar, pipe.config.diffusion.prediction, "x0")
        track = centroid_track(x0.clamp(-1, 1)).mean(dim=0)  # (T, 2)
        drift[direction] = (track[-1] - track[0]).tolist()
    assert drift["left"][0] < -2 and drift["right"][0] > 2, drift
    assert drift["up"][1] < -2 and drift["down"][1] > 2, drift


def test_channels_last_works_for_a_video_model_and_draws_the_same_clip(tmp_path):
    """channels_last exists for rank-4 tensors only: the 2-D convolutions change layout, the temporal
    convolutions' 5-D weights keep theirs (Module.to(memory_format=...) would fail on them)."""
    plain = MatryoshkaPipeline.from_pretrained("fashion-t2v")
    reference = plain("a bag moving up", num_inference_steps=3, generator=0, output_type="pt").tensors[0]
    assert plain.to(memory_format=torch.channels_last) is plain
    weights = [p for p in plain.model.parameters() if p.dim() >= 4]
    assert any(w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in weights)
    assert any(w.dim() == 5 for w in weights)
    clip = plain("a bag moving up", num_inference_steps=3, generator=0, output_type="pt").tensors[0]
    assert (clip - reference).abs().max() < 1e-4  # summation order only
    out = tmp_path / "cl.gif"
    argv = ["generate", "a bag moving up", "--model", "fashion-t2v", "--steps", "2", "--channels-last", "--quiet",
            "--out", str(out)]
    assert cli.main(argv) == 0 and len(gif_frames(out)) == 8
