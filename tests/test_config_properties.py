"""Property tests over model configs: every config is either refused at load time with the field
named, or builds a NestedUNet that runs. No config may fail later, inside the network."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig
from matryoshka.models import ModelConfig, NestedUNet
from matryoshka.typed_config import ConfigError, from_dict

widths = st.sampled_from([4, 6, 8, 12, 16])


@st.composite
def level_dicts(draw, core: bool):
    n = draw(st.integers(1, 3))
    level = {
        "channels": draw(st.lists(widths, min_size=n, max_size=n)),
        # Mostly valid counts; sometimes a 0 or a list of the wrong length, which must be refused.
        "num_res_blocks": draw(st.lists(st.integers(0, 2) if draw(st.integers(0, 9)) == 0 else st.integers(1, 2),
                                        min_size=n, max_size=n + (draw(st.integers(0, 9)) == 0))),
        "norm_groups": draw(st.sampled_from([1, 2, 2, 4, 4, 3, 8])),
        "num_heads": draw(st.sampled_from([1, 2, 3, 4])),
        "temb_dim": draw(st.sampled_from([None, 16, 20, 32])),
    }
    if draw(st.booleans()):
        level["attention_layers"] = draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n))
    if core:
        level["mid_block"] = draw(st.booleans())
    return level


@st.composite
def model_dicts(draw):
    num_levels = draw(st.integers(1, 3))
    levels = [draw(level_dicts(core=i == num_levels - 1)) for i in range(num_levels)]
    return {
        "levels": levels,
        "image_size": draw(st.sampled_from([4, 8, 12, 16, 24, 32])),
        "in_channels": draw(st.sampled_from([1, 3])),
        "num_classes": draw(st.sampled_from([0, 3])),
    }


@given(model_dicts())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_configs_are_refused_with_a_field_or_run(data):
    try:
        config = from_dict(ModelConfig, data)
    except ConfigError as err:
        assert err.path, "a refused config must name its field"
        assert str(err).startswith(err.path)
        return
    model = NestedUNet(config)
    pyramid = [torch.randn(1, config.in_channels, s, s) for s in config.sizes]
    outputs = model(pyramid, torch.tensor([7]))
    assert [o.shape[-1] for o in outputs] == config.sizes


@pytest.mark.parametrize(
    "data, field",
    [
        ({"level_weights": [1.0, -1.0]}, "level_weights"),
        ({"mixed_ratio": [0.5, 0.5]}, "mixed_ratio"),
        ({"threshold": "clamp"}, "threshold"),
        ({"num_train_steps": "many"}, "num_train_steps"),
        ({"shift_power": -1}, "shift_power"),
        ({"schedul": "linear"}, "schedul"),
    ],
)
def test_diffusion_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        from_dict(DiffusionConfig, data)
    assert err.value.path.startswith(field)


def test_per_level_lists_must_match_the_model():
    model = {"levels": [{"channels": [8, 8], "num_res_blocks": [1, 1], "norm_groups": 4},
                        {"channels": [8], "num_res_blocks": [1], "norm_groups": 4}], "image_size": 16}
    with pytest.raises(ConfigError) as err:
        from_dict(MDMConfig, {"model": model, "diffusion": {"level_weights": [1.0, 1.0, 1.0]}})
    assert "level_weights" in str(err.value) and "2 levels" in str(err.value)
