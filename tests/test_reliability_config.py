"""Config errors are refused when the training config is loaded, with the field named, never later in
the run. Property tests draw training stage lists (the model configs have tests/test_config_properties.py)
and compare the loader with an independent statement of the rules: every config the rules reject is
refused naming a field that is really wrong, every config they accept loads and each of its stages
builds a model that runs. A table of hand-written bad configs goes through `matryoshka train`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matryoshka.cli import main
from matryoshka.models import NestedUNet
from matryoshka.training import TrainConfig, load_train_config, stage_mdm_config
from matryoshka.training.testing import tiny_config_dict
from matryoshka.typed_config import ConfigError, from_dict

NOT_AN_INT = st.sampled_from(["2", 1.5, None, True, [1]])
NOT_A_NUMBER = st.sampled_from(["fast", None, True, [0.1]])


def three_level_dict() -> dict[str, Any]:
    """The tiny run with a third (4 px) level, so that stages can nest in more ways."""
    raw = tiny_config_dict()
    level = {"channels": [8, 8], "num_res_blocks": [1, 1], "norm_groups": 4, "temb_dim": 32}
    raw["mdm"]["model"]["levels"].insert(0, level)
    raw["mdm"]["model"]["image_size"] = 32
    return raw


BASE = three_level_dict()
NUM_LEVELS = 3


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@st.composite
def stage_dicts(draw, clean: bool) -> dict[str, Any]:
    """One stage; `clean` draws only values the rules allow, otherwise any field may be wrong."""

    def pick(good: st.SearchStrategy, bad: st.SearchStrategy) -> Any:
        return draw(good if clean or draw(st.integers(0, 5)) else bad)

    levels = pick(st.integers(1, NUM_LEVELS), st.one_of(st.integers(-1, NUM_LEVELS + 1), NOT_AN_INT))
    stage: dict[str, Any] = {"levels": levels, "steps": pick(st.integers(1, 3), st.one_of(st.integers(-1, 0),
                                                                                          NOT_AN_INT))}
    if draw(st.integers(0, 3)) == 0:
        n = levels if is_int(levels) and levels >= 0 and (clean or draw(st.booleans())) else draw(st.integers(0, 4))
        weight = st.sampled_from([0.0, 0.5, 2.0]) if clean else st.sampled_from([-1.0, 0.0, 0.5, 2.0])
        stage["level_weights"] = draw(st.lists(weight, min_size=n, max_size=n))
    if draw(st.integers(0, 4)) == 0:
        stage["lr"] = pick(st.sampled_from([1e-4, 1e-3]), st.one_of(st.sampled_from([-1e-3, 0.0]), NOT_A_NUMBER))
    if draw(st.integers(0, 4)) == 0:
        stage["batch_size"] = pick(st.sampled_from([2, 4]), st.one_of(st.just(0), NOT_AN_INT))
    if draw(st.integers(0, 4)) == 0:
        stage["warmup_steps"] = pick(st.sampled_from([0, 2]), st.just(-1))
    if draw(st.integers(0, 4)) == 0:
        stage["lr_schedule"] = pick(st.sampled_from(["constant", "cosine"]), st.sampled_from(["linear", 1]))
    if not clean and draw(st.integers(0, 8)) == 0:
        stage[draw(st.sampled_from(["level", "step", "lvls", "learning_rate"]))] = 1
    return stage


@st.composite
def stage_lists(draw) -> list[dict[str, Any]]:
    """Half the lists are clean (valid but for their order); the order is mostly the nesting one."""
    clean = draw(st.booleans())
    stages = draw(st.lists(stage_dicts(clean), min_size=0 if not clean else 1, max_size=4))
    if draw(st.integers(0, 3)):  # mostly in nesting order (the int levels sorted in place)
        ints = sorted(stage["levels"] for stage in stages if is_int(stage["levels"]))
        for stage in stages:
            if is_int(stage["levels"]):
                stage["levels"] = ints.pop(0)
    return stages


def wrong_fields(stages: Any) -> set[str]:
    """Every field the rules of docs/training (and StageConfig's comments) say is wrong, as dotted paths."""
    if not isinstance(stages, list):
        return {"stages"}
    if not stages:
        return {"stages"}
    wrong: set[str] = set()
    known = {"levels", "steps", "level_weights", "lr", "batch_size", "warmup_steps", "lr_schedule",
             "frames_as_images", "init_inner_from"}
    previous = 0
    for i, stage in enumerate(stages):
        path = f"stages[{i}]"
        wrong |= {f"{path}.{key}" for key in stage if key not in known}
        levels, steps = stage.get("levels"), stage.get("steps")
        if not is_int(levels) or not 1 <= levels <= NUM_LEVELS or levels < previous:
            wrong.add(f"{path}.levels")
        if not is_int(steps) or steps < 1:
            wrong.add(f"{path}.steps")
        weights = stage.get("level_weights")
        if weights is not None and (
            not is_int(levels) or len(weights) != levels or any(w < 0 for w in weights)
        ):
            wrong.add(f"{path}.level_weights")
        lr = stage.get("lr")
        if lr is not None and (not is_number(lr) or lr <= 0):
            wrong.add(f"{path}.lr")
        batch = stage.get("batch_size")
        if batch is not None and (not is_int(batch) or batch < 1):
            wrong.add(f"{path}.batch_size")
        warmup = stage.get("warmup_steps")
        if warmup is not None and warmup < 0:
            wrong.add(f"{path}.warmup_steps")
        if stage.get("lr_schedule", "constant") not in ("constant", "cosine"):
            wrong.add(f"{path}.lr_schedule")
        if is_int(levels) and levels >= 1:
            previous = max(previous, levels)
    return wrong


@given(stage_lists())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_stage_lists_are_refused_naming_a_wrong_field_or_load_and_run(stages):
    raw = copy.deepcopy(BASE)
    raw["stages"] = stages
    wrong = wrong_fields(stages)
    try:
        config = from_dict(TrainConfig, raw)
    except ConfigError as error:
        assert wrong, f"a valid stage list was refused: {error}"
        assert str(error).startswith(error.path + ":")
        assert error.path in wrong or error.path.rsplit("[", 1)[0] in wrong, (error.path, wrong)
        return
    assert not wrong, f"accepted a config with wrong fields {wrong}"
    levels = [stage.levels for stage in config.stages]
    assert levels == sorted(levels) and levels[0] >= 1 and levels[-1] <= NUM_LEVELS
    assert config.total_steps == sum(stage["steps"] for stage in stages)
    # Every stage is the innermost part of the final model, and builds a network that runs.
    for index, stage in enumerate(config.stages):
        mdm = stage_mdm_config(config, index)
        assert mdm.model.sizes == config.mdm.model.sizes[-stage.levels:]
        assert stage_runs(repr(mdm.model), mdm.model)


_RUNS: dict[str, bool] = {}


def stage_runs(key: str, model_config) -> bool:
    """A stage's network builds and predicts every level (once per distinct model config)."""
    if key not in _RUNS:
        model = NestedUNet(model_config)
        pyramid = [torch.zeros(1, 1, size, size) for size in model_config.sizes]
        outputs = model(pyramid, torch.tensor([5]), labels=torch.tensor([1]))
        _RUNS[key] = [o.shape for o in outputs] == [p.shape for p in pyramid]
    return _RUNS[key]


@given(st.lists(st.integers(1, NUM_LEVELS), min_size=2, max_size=4).filter(lambda ls: ls != sorted(ls)))
@settings(max_examples=30, deadline=None)
def test_stages_that_do_not_nest_are_refused_at_the_first_shrinking_stage(levels):
    raw = copy.deepcopy(BASE)
    raw["stages"] = [{"levels": n, "steps": 1} for n in levels]
    first = next(i for i in range(1, len(levels)) if levels[i] < max(levels[:i]))
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, raw)
    assert info.value.path == f"stages[{first}].levels" and "must nest" in str(info.value)


# Hand-written bad configs, given as --set overrides of the tiny run: (override, the field named).
BAD = [
    ("mdm.model.image_size=18", "mdm.model.image_size"),  # not divisible by the nesting ratio and the downsampling
    ("mdm.model.image_size=30", "mdm.model.image_size"),
    ("mdm.model.levels.0.channels=[6, 8]", "mdm.model.levels[0].channels[0]"),  # 6 % norm_groups 4
    ("mdm.model.levels.1.norm_groups=3", "mdm.model.levels[1].channels[0]"),
    ("mdm.model.levels.1.num_heads=3", "mdm.model.levels[1].channels[1]"),  # attention width 16 % 3 heads
    ("mdm.model.levels.0.channels=[8]", "mdm.model.levels[0].num_res_blocks"),  # per-resolution lists disagree
    ("mdm.diffusion.level_weights=[1.0]", "mdm.diffusion.level_weights"),  # one weight for two levels
    ("mdm.diffusion.mixed_ratio=[0.5, 0.5, 1.0]", "mdm.diffusion.mixed_ratio"),
    ("optimizer={lr: 0.1}", "optimizer"),  # unknown keys, at every depth
    ("optim.learning_rate=0.1", "optim.learning_rate"),
    ("stages.0.lvls=1", "stages[0].lvls"),
    ("mdm.model.levels.0.chanels=[8, 8]", "mdm.model.levels[0].chanels"),
    ("stages.0.steps=ten", "stages[0].steps"),  # wrong types
    ("stages.0.levels=1.5", "stages[0].levels"),
    ("data.batch_size=true", "data.batch_size"),
    ("optim.lr=[0.1]", "optim.lr"),
    ("stages=all", "stages"),
    ("stages=[]", "stages"),
    ("stages=[{levels: 2, steps: 1}, {levels: 1, steps: 1}]", "stages[1].levels"),  # do not nest
    ("stages=[{levels: 3, steps: 1}]", "stages[0].levels"),  # more levels than the model
    ("stages.1.level_weights=[1.0]", "stages[1].level_weights"),
    ("optim.max_nonfinite_steps=0", "optim.max_nonfinite_steps"),
    ("data.max_failure_ratio=1.5", "data.max_failure_ratio"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
]


@pytest.mark.parametrize(("override", "field"), BAD, ids=[b[0][:48] for b in BAD])
def test_bad_configs_are_refused_at_load_time_naming_the_field(tmp_path: Path, override: str, field: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict()), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_train_config(path, [override])
    assert info.value.path == field, str(info.value)


@pytest.mark.parametrize(("override", "field"), BAD[::4], ids=[b[0][:48] for b in BAD[::4]])
def test_the_command_refuses_them_before_writing_anything(tmp_path: Path, capsys, override: str, field: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict()), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert f"invalid config {path}: {field}:" in err and "Traceback" not in err
    assert not out.exists()


def test_a_config_file_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path: Path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_train_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("stages: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(tmp_path / "broken.yaml")
    (tmp_path / "code.yaml").write_text("stages: !!python/object/apply:os.system ['true']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load: tags that build objects are refused
        load_train_config(tmp_path / "code.yaml")
