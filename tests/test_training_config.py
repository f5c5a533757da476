"""Training configs: typed loading, --set overrides, stage checks, and every preset in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from matryoshka.models import NestedUNet
from matryoshka.training import TrainConfig, apply_overrides, load_train_config, stage_mdm_config
from matryoshka.training.testing import tiny_config, tiny_config_dict
from matryoshka.typed_config import ConfigError, from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
TINY_PRESETS = [p for p in PRESETS if p.name.startswith("fashion_")]



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_presets_exist():
    names = {p.name for p in PRESETS}
    for wanted in (
        "fashion_tiny_32x16.yaml", "fashion_tiny_3level.yaml", "imagenet256_classcond.yaml", "t2i_256.yaml",
        "t2i_1024.yaml",
    ):
        assert wanted in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_its_stages_nest(path: Path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig)
    levels = [stage.levels for stage in config.stages]
    assert levels == sorted(levels) and levels[-1] == config.mdm.model.num_levels
    for index in range(len(config.stages)):
        mdm = stage_mdm_config(config, index)
        mdm.validate()
        assert mdm.model.num_levels == config.stages[index].levels


@pytest.mark.parametrize("path", TINY_PRESETS, ids=lambda p: p.name)
def test_tiny_presets_instantiate_and_run(path: Path):
    config = load_train_config(path)
    model = NestedUNet(config.mdm.model)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000  # trainable on a CPU in minutes
    m = config.mdm.model
    pyramid = [torch.randn(2, m.in_channels, s, s) for s in m.sizes]
    outputs = model(pyramid, torch.tensor([3, 500]), labels=torch.tensor([1, m.num_classes]) if m.num_classes else None)
    assert [o.shape for o in outputs] == [p.shape for p in pyramid]


def test_t2i_1024_preset_is_the_official_architecture():
    config = load_train_config(CONFIGS / "t2i_1024.yaml")
    m = config.mdm.model
    assert m.sizes == [1024, 256, 64] and m.text_dim == 2048
    outer, middle, core = m.levels
    assert core.channels == [256, 512, 768] and core.num_res_blocks == [2, 2, 2]
    assert core.attention_layers == [0, 1, 5] and core.attention_ffn and core.mid_block
    assert middle.channels == [64, 128, 256] and middle.num_res_blocks == [2, 2, 1]
    assert outer.channels == [32, 32, 64] and outer.num_res_blocks == [2, 2, 1]
    assert all(level.time_embedding_dim == 1024 for level in m.levels)
    assert config.mdm.diffusion.shift_power == 2 and config.mdm.diffusion.level_weights == [16, 4, 1]
    assert load_train_config(CONFIGS / "t2i_256.yaml").mdm.diffusion.shift_power == 1


def test_overrides_are_parsed_as_yaml_and_typed(tmp_path: Path):
    path = write(tmp_path, tiny_config_dict())
    config = load_train_config(path, ["optim.lr=2e-4", "stages.1.steps=7", "optim.grad_clip=null", "data.limit=9"])
    assert config.optim.lr == 2e-4 and config.stages[1].steps == 7
    assert config.optim.grad_clip is None and config.data.limit == 9
    assert apply_overrides({}, ["ema.decay=0.5"]) == {"ema": {"decay": 0.5}}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lrr=1", "optim.lrr"),  # unknown key
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("stages.1.levels=3", "stages[1].levels"),  # more levels than the model
        ("stages.1.levels=0", "stages[1].levels"),
        ("stages.1.level_weights=[1.0]", "stages[1].level_weights"),  # length != stage levels
        ("distributed=horovod", "distributed"),
        ("stages.5.steps=1", "stages.5"),  # no such stage
        ("optim.lr", "optim.lr"),  # no '='
    ],
)
def test_bad_values_are_refused_with_the_field_named(override: str, field: str):
    with pytest.raises(ConfigError) as info:
        tiny_config([override])
    assert str(info.value).startswith(field), str(info.value)


def test_stages_must_nest():
    raw = tiny_config_dict()
    raw["stages"] = [{"levels": 2, "steps": 1}, {"levels": 1, "steps": 1}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.levels.*must nest"):
        from_dict(TrainConfig, raw)


def test_stage_diffusion_takes_the_innermost_entries():
    config = tiny_config(["mdm.diffusion.mixed_ratio=[0.5, 1.0]", "mdm.diffusion.level_weights=[4.0, 1.0]"])
    first = stage_mdm_config(config, 0)
    assert first.diffusion.mixed_ratio == [1.0] and first.diffusion.level_weights == [1.0]
    assert first.model.sizes == [8]
    second = stage_mdm_config(config, 1)
    assert second.diffusion.mixed_ratio == [0.5, 1.0] and second.diffusion.level_weights == [4.0, 1.0]


def test_cli_refuses_a_bad_config_naming_the_field(tmp_path: Path, capsys):
    from matryoshka.cli import main

    path = write(tmp_path, tiny_config_dict())
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--set", "optim.betas=[0.9]"]) == 2
    assert "optim.betas" in capsys.readouterr().err
