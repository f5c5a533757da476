"""NestedUNet: shapes at any depth, nesting semantics, conditioning paths, config validation, a few
training steps that lower the loss."""

from __future__ import annotations

import pytest
import torch

from matryoshka import losses
from matryoshka import pyramid as pyr
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.typed_config import ConfigError, from_dict, to_dict


def tiny_config(levels: int = 2, **kwargs) -> ModelConfig:
    outer = [LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32) for _ in range(levels - 1)]
    core = LevelConfig(
        [8, 16], [1, 1], attention_layers=[0, 1], attention_ffn=True, num_heads=2, mid_block=True,
        norm_groups=4, attention_norm_groups=4, temb_dim=32,
    )
    return ModelConfig(levels=[*outer, core], image_size=8 * 2**levels, in_channels=1, **kwargs)


def _inputs(config: ModelConfig, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, config.in_channels, s, s, generator=gen) for s in config.sizes]


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_shapes_at_any_depth(levels):
    config = tiny_config(levels)
    model = NestedUNet(config)
    outputs = model(_inputs(config), torch.tensor([0, 999]))
    assert [tuple(o.shape) for o in outputs] == [(2, 1, s, s) for s in config.sizes]
    assert config.scales == [2 ** (levels - 1 - i) for i in range(levels)]


def test_widths_need_not_be_multiples_of_32():
    config = ModelConfig(
        levels=[LevelConfig([12, 24], [1, 1], attention_layers=[0, 1], num_heads=3, norm_groups=6, mid_block=True)],
        image_size=8,
        in_channels=3,
    )
    out = NestedUNet(config)(_inputs(config), torch.tensor([5, 6]))
    assert out[0].shape == (2, 3, 8, 8)


def test_nesting_a_trained_model_keeps_its_predictions():
    """Adapters start at zero: the nested model's inner level equals the old model's output."""
    config = tiny_config(2, num_classes=3, text_dim=6, text_proj_dim=8)
    inner = NestedUNet(config.innermost(1))
    for p in inner.parameters():  # make every path count, zero-initialised layers included
        torch.nn.init.normal_(p, std=0.1)
    outer = NestedUNet(config)
    outer.inner_unet.load_state_dict(inner.state_dict())
    x = _inputs(config)
    t = torch.tensor([10, 700])
    text, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([0, 3])
    expected = inner([x[1]], t, text, mask, labels)[0]
    got = outer(x, t, text, mask, labels)[1]
    torch.testing.assert_close(got, expected)


def test_conditioning_changes_outputs():
    config = tiny_config(2, num_classes=3, text_dim=6)
    model = NestedUNet(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = _inputs(config), torch.tensor([100, 100])
    text = torch.randn(2, 4, 6)
    base = model(x, t, text, torch.ones(2, 4), torch.tensor([0, 0]))
    other_label = model(x, t, text, torch.ones(2, 4), torch.tensor([1, 1]))
    other_text = model(x, t, text + 1, torch.ones(2, 4), torch.tensor([0, 0]))
    masked = model(x, t, text, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]), torch.tensor([0, 0]))
    for changed in (other_label, other_text, masked):
        assert not torch.allclose(base[0], changed[0])


def test_mixed_batch_rows():
    config = tiny_config(2)
    model = NestedUNet(config)
    x = _inputs(config, batch=4)
    outputs = model([x[0][:1], x[1]], torch.tensor([1, 2, 3, 4]))
    assert outputs[0].shape[0] == 1 and outputs[1].shape[0] == 4


def test_micro_conditioning_defaults_and_values():
    config = tiny_config(2)
    config.levels[0].micro_conditioning = {"scale": 16.0}
    model = NestedUNet(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = _inputs(config), torch.tensor([3, 4])
    default = model(x, t)
    explicit = model(x, t, micros={"scale": torch.tensor([16.0, 16.0])})
    smaller = model(x, t, micros={"scale": torch.tensor([4.0, 4.0])})
    torch.testing.assert_close(default[0], explicit[0])
    assert not torch.allclose(default[0], smaller[0])


def test_video_model_runs_with_temporal_layers():
    core = LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4,
                       attention_norm_groups=4, temb_dim=32, temporal_attention_layers=[0, 1], temporal_conv=True)
    outer = LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32, temporal_conv=True)
    config = ModelConfig(levels=[outer, core], image_size=16, in_channels=3, num_frames=4, temporal_ratios=[2])
    model = NestedUNet(config)
    pyramid = [torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 2, 8, 8)]
    out = model(pyramid, torch.tensor([1, 2]))
    assert out[0].shape == (2, 3, 4, 16, 16) and out[1].shape == (2, 3, 2, 8, 8)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["levels"][0].update(channels=[10, 8]), "channels[0]"),
        (lambda d: d["levels"][0].update(num_res_blocks=[1]), "num_res_blocks"),
        (lambda d: d.update(image_size=18), "image_size"),
        (lambda d: d["levels"][0].update(colour="red"), "colour"),
        (lambda d: d["levels"][1].update(channels="wide"), "channels"),
        (lambda d: d["levels"][0].update(temb_dim=64), "temb_dim"),
    ],
)
def test_invalid_configs_name_the_field(change, field):
    data = to_dict(tiny_config(2, num_classes=2))
    change(data)
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data)
    assert field in str(err.value)


def test_config_round_trip():
    config = tiny_config(3, text_dim=6)
    assert from_dict(ModelConfig, to_dict(config)) == config


def test_a_tiny_nested_unet_learns():
    """A few Adam steps on a fixed batch lower the multi-resolution loss at every level."""
    torch.manual_seed(0)
    config = tiny_config(2, num_classes=2)
    model = NestedUNet(config)
    diffusion = DiffusionConfig()
    schedule = PyramidSchedule.from_config(diffusion, config.scales)
    images = torch.zeros(8, 1, 32, 32)
    images[:, :, 8:24, 8:24] = 1.0  # a bright square on black
    clean = pyr.build_pyramid(images * 2 - 1, config.scales)
    gen = torch.Generator().manual_seed(1)
    noise = pyr.sample_noise(clean, gen)
    t = torch.randint(100, 900, (8,), generator=gen)
    noisy = [pyr.add_noise(c, n, g) for c, n, g in zip(clean, noise, schedule.at(t + 1), strict=True)]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        out = losses.multi_resolution_loss(model(noisy, t), clean, noise, noisy, t, schedule, diffusion)
        optimizer.zero_grad()
        out.mean().backward()
        optimizer.step()
        history.append([level.mean().item() for level in out.per_level])
    for level in range(2):
        assert history[-1][level] < 0.7 * history[0][level]


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config(3, num_classes=2)
    model = NestedUNet(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = _inputs(config), torch.tensor([5, 600])

    def grads():
        model.zero_grad()
        sum(o.square().mean() for o in model(x, t, labels=torch.tensor([0, 1]))).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True, outer_only=False)
    checkpointed = grads()
    assert model.gradient_checkpointing and model.inner_unet.inner_unet.gradient_checkpointing
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b)
