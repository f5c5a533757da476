"""`matryoshka train` on video: moving Fashion-MNIST data, an image-like first stage, temporal nesting,
video pyramids in the loss, previews as GIF; the presets validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.model_dir import MDMConfig, load_model_dir, save_model_dir
from matryoshka.models import NestedUNet
from matryoshka.training import diffusion_loss, initial_models, train
from matryoshka.training.config import TrainConfig
from matryoshka.training.loop import one_frame_each
from matryoshka.training.testing import tiny_config
from matryoshka.typed_config import ConfigError, from_dict
from matryoshka.video import image_counterpart, read_video

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# A 4-frame 16 px band over a 1-frame 16 px image core (nesting over time only), like video_paper.yaml's
# 16 x 64 band over its 64 px image model.
PAPER_LIKE = [
    "mdm.model.image_size=16",
    "mdm.model.num_frames=4",
    "mdm.model.temporal_ratios=[4]",
    "mdm.model.levels.0.channels=[8]",
    "mdm.model.levels.0.num_res_blocks=[1]",
    "mdm.model.levels.0.temporal_attention_layers=[1]",
    "mdm.model.levels.0.num_heads=2",
    "data.dataset=moving_fashion_mnist",
]

VIDEO = [
    "mdm.model.image_size=32",
    "mdm.model.num_classes=40",  # class * 4 + direction
    "mdm.model.num_frames=4",
    "mdm.model.temporal_ratios=[2]",
    "mdm.model.levels.0.temporal_conv=true",
    "mdm.model.levels.1.temporal_attention_layers=[0, 1]",
    "data.dataset=moving_fashion_mnist",
    "data.split=test",
    "data.limit=32",
    "stages=[{levels: 1, steps: 2, frames_as_images: true}, {levels: 1, steps: 2}, {levels: 2, steps: 2}]",
]


def test_progressive_video_training_from_an_image_like_base(tmp_path):
    config = tiny_config(VIDEO)
    result = train(config, tmp_path / "run")
    model, mdm = load_model_dir(result.model_dir)
    assert mdm.model.num_frames == 4 and mdm.model.frames == [4, 2]

    def temporal(directory: Path) -> list[torch.Tensor]:
        stage_model, _ = load_model_dir(directory)
        return [p for name, p in stage_model.named_parameters() if "t_layers" in name and "proj_out" in name]

    # Stage 1 saw single frames: its temporal layers were skipped and are still exactly zero.
    assert all(p.abs().max() == 0 for p in temporal(tmp_path / "run" / "stages" / "stage-1"))
    assert any(p.abs().max() > 0 for p in temporal(tmp_path / "run" / "stages" / "stage-2"))
    gif = tmp_path / "run" / "samples" / "step-0000006.gif"
    assert read_video(gif, channels=1).shape[1] == 4  # the preview animation has every frame


def test_video_batches_become_video_pyramids():
    config = tiny_config(VIDEO)
    mdm = config.mdm
    assert mdm.model.level_shapes() == [(1, 4, 32, 32), (1, 2, 16, 16)]
    assert mdm.model.level_shapes(images=True) == [(1, 32, 32), (1, 16, 16)]
    clips = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 1, 4, 1, 1).expand(3, 1, 4, 2, 2)
    frames = one_frame_each(clips, first_sample=5)  # samples 5, 6, 7 -> frames 1, 2, 3
    assert frames.shape == (3, 1, 2, 2) and frames[:, 0, 0, 0].tolist() == [1.0, 6.0, 11.0]

    model = NestedUNet(mdm.model)
    diffusion = DiffusionConfig()
    schedule = PyramidSchedule.from_config(diffusion, mdm.model.scales)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append([tuple(x.shape) for x in args[0]]))
    noise = [torch.randn(2, *shape) for shape in mdm.model.level_shapes()]
    loss = diffusion_loss(model, torch.randn(2, 1, 4, 32, 32), mdm.model.scales, torch.tensor([3, 500]), noise,
                          {}, schedule, diffusion, time_scales=mdm.model.time_scales)
    assert seen == [[(2, 1, 4, 32, 32), (2, 1, 2, 16, 16)]] and loss.total.shape == (2,)


@pytest.mark.parametrize(
    "change, field",
    [
        (["data.dataset=fashion_mnist"], "data.dataset"),  # images for a video model
        (["mdm.model.num_frames=0", "mdm.model.temporal_ratios=null", "mdm.model.levels.0.temporal_conv=false",
          "mdm.model.levels.1.temporal_attention_layers=null"], "data.dataset"),  # clips for an image model
        (["data.stride=0"], "stride"),
    ],
)
def test_video_training_configs_name_the_problem(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(VIDEO + change)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.frames_as_images"):
        tiny_config(["stages=[{levels: 1, steps: 1, frames_as_images: true}]"])


@pytest.mark.parametrize("name", ["video_tiny.yaml", "video_paper.yaml"])
def test_video_presets_validate(name):
    config = from_dict(TrainConfig, yaml.safe_load((CONFIGS / name).read_text()))
    model = config.mdm.model
    assert model.num_frames > 0 and config.data.dataset in ("moving_fashion_mnist", "video_folder", "video_shards")
    if name == "video_paper.yaml":  # 16 x 256 over 16 x 64 over a 64 x 64 image model
        assert model.frames == [16, 16, 1] and model.sizes == [256, 64, 64]
        core = model.levels[-1]  # the image model: one frame, no temporal layers, weights from init_inner_from
        assert core.temporal_attention_layers is None and not core.temporal_conv
        assert config.stages[0].init_inner_from is not None


def test_init_inner_from_an_image_model_inflates_it(tmp_path):
    """The paper's start: a video band (time only) around an image model given by init_inner_from."""
    image = NestedUNet(image_counterpart(tiny_config(PAPER_LIKE).mdm.model, 1))
    with torch.no_grad():
        for p in image.parameters():
            p.normal_(0, 0.1)
    save_model_dir(tmp_path / "image", image, MDMConfig(model=image.config, diffusion=DiffusionConfig()))
    config = tiny_config(PAPER_LIKE + [f"stages=[{{levels: 2, steps: 1, init_inner_from: {tmp_path / 'image'}}}]"])
    model, ema_model = initial_models(config, 0, None)
    assert model.config.frames == [4, 1]
    for name, value in image.state_dict().items():
        assert torch.equal(model.inner_unet.state_dict()[name], value)
        assert torch.equal(ema_model.inner_unet.state_dict()[name], value)
    bad = tiny_config(PAPER_LIKE + ["mdm.model.levels.1.channels=[8, 8]",
                                    f"stages=[{{levels: 2, steps: 1, init_inner_from: {tmp_path / 'image'}}}]"])
    with pytest.raises(ConfigError, match="init_inner_from"):
        initial_models(bad, 0, None)


def test_an_inflated_image_model_trains_only_its_temporal_layers(tmp_path):
    """configs/video_from_image.yaml's way: the whole image model inflated into the video model (all levels),
    then `trainable: temporal` moves the temporal layers and frame embeddings and nothing else."""
    from matryoshka.video import temporal_parameters

    video = VIDEO[:-1] + ["mdm.model.levels.1.temporal_conv=true", "mdm.model.levels.0.frame_embedding=true"]
    config = tiny_config(video)
    image = NestedUNet(image_counterpart(config.mdm.model, 2))
    with torch.no_grad():
        for p in image.parameters():
            p.normal_(0, 0.05)
    save_model_dir(tmp_path / "image", image, MDMConfig(model=image.config, diffusion=DiffusionConfig()))
    stage = f"stages=[{{levels: 2, steps: 3, init_inner_from: {tmp_path / 'image'}, trainable: temporal}}]"
    result = train(tiny_config([*video, stage, "logging.sample_count=0", "logging.progress=false"]),
                   tmp_path / "run", quiet=True)
    trained = result.model.state_dict()
    temporal = {id(p) for p in temporal_parameters(result.model)}
    names = {name for name, p in result.model.named_parameters() if id(p) in temporal}
    assert names
    for name, value in image.state_dict().items():  # every image weight exactly as given
        assert torch.equal(trained[name], value), name
    initial, _ = initial_models(tiny_config([*video, stage]), 0, None)
    assert any(not torch.equal(trained[n], initial.state_dict()[n]) for n in names)  # the temporal ones moved
    with pytest.raises(ConfigError, match="trainable"):
        tiny_config(["stages=[{levels: 2, steps: 1, trainable: temporal}]"])


def test_channels_last_trains_a_video_model_like_the_contiguous_layout(tmp_path):
    """optim.channels_last on a model with 3-D (temporal) convolutions: their 5-D weights keep their
    layout, the 2-D convolutions go channels-last, and training follows the same numbers."""
    overrides = [*VIDEO, "mdm.model.levels.1.temporal_conv=true", "mdm.model.levels.1.temporal_conv_space=3",
                 "stages=[{levels: 2, steps: 3}]", "logging.sample_count=0"]
    plain = train(tiny_config(overrides), tmp_path / "plain")
    last = train(tiny_config([*overrides, "optim.channels_last=true"]), tmp_path / "channels-last")
    (a, _), (b, _) = load_model_dir(plain.model_dir), load_model_dir(last.model_dir)
    assert any(p.dim() == 5 for p in a.parameters())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-5), name
