"""precision="auto": bf16 or fp32, whichever this machine runs faster for the model, measured once and
cached; in the pipeline, `generate`/`demo` and the trainer (where a resumed run keeps its precision)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import matryoshka.precision as precision_module
from helpers import random_model
from matryoshka.precision import bf16_speedup, resolve_precision
from matryoshka.training.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def model():
    return random_model(tiny_config().mdm.model)


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A CPU with bf16 hardware whose measured bf16 speed-up is `measured.speedup`; counts measurements."""

    class Fake:
        speedup = 1.5
        calls: list[tuple[int, bool]] = []

    def fake(model, rows, train, **kwargs):
        Fake.calls.append((rows, train))
        return Fake.speedup

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(precision_module, "default_cache_dir", lambda: tmp_path / "cache")  # fakes stay here
    monkeypatch.setattr(precision_module, "bf16_speedup", fake)
    Fake.calls = []
    return Fake


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused(model):
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, model, "cpu", 4) == name
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("half", model, "cpu", 4)


def test_auto_is_fp32_on_a_cpu_without_bf16_hardware_and_measures_nothing(model, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(precision_module, "bf16_speedup", lambda *a, **k: pytest.fail("measured"))
    assert resolve_precision("auto", model, "cpu", 4) == "fp32"


def test_auto_measures_once_per_model_rows_and_pass_then_reads_the_cache(model, measured, tmp_path):
    assert resolve_precision("auto", model, "cpu", 4, cache_dir=tmp_path) == "bf16"
    assert resolve_precision("auto", model, "cpu", 4, cache_dir=tmp_path) == "bf16"
    assert resolve_precision("auto", model.config, "cpu", 4, cache_dir=tmp_path) == "bf16"  # a config: same key
    assert measured.calls == [(4, False)]
    entries = json.loads((tmp_path / "precision.json").read_text())
    assert [e["speedup"] for e in entries.values()] == [1.5]

    measured.speedup = 1.02  # faster, but not by MIN_SPEEDUP: float32's exact arithmetic wins
    assert resolve_precision("auto", model, "cpu", 8, cache_dir=tmp_path) == "fp32"
    assert resolve_precision("auto", model, "cpu", 4, train=True, cache_dir=tmp_path) == "fp32"
    other = random_model(tiny_config(["mdm.model.levels.0.channels=[8, 16]"]).mdm.model)
    assert resolve_precision("auto", other, "cpu", 4, cache_dir=tmp_path) == "fp32"
    assert measured.calls == [(4, False), (8, False), (4, True), (4, False)]

    (tmp_path / "precision.json").write_text("{not json")  # a damaged cache is measured again, not fatal
    measured.speedup = 2.0
    assert resolve_precision("auto", model, "cpu", 4, cache_dir=tmp_path) == "bf16"


def test_bf16_speedup_is_the_median_ratio_and_leaves_random_state_and_gradients_alone(model):
    ticks = iter([0, 2, 3, 10, 13, 14, 20, 22, 24])  # per round: fp32 2, 3, 2 ticks; bf16 1, 1, 2 ticks
    model.train()
    for p in model.parameters():
        p.grad = None
    state = torch.get_rng_state()
    assert bf16_speedup(model, 2, train=True, rounds=3, timer=lambda: next(ticks)) == 2.0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def test_pipeline_auto_runs_the_measured_precision(model, measured):
    from matryoshka.diffusion import DiffusionConfig
    from matryoshka.model_dir import MDMConfig
    from matryoshka.pipeline import MatryoshkaPipeline

    pipe = MatryoshkaPipeline(model, MDMConfig(model=model.config, diffusion=DiffusionConfig()))
    dtypes = []
    model.conv_out.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    pipe(class_labels=[1, 7, 3], num_inference_steps=2, guidance_scale=2.0, generator=0, progress=False,
         precision="auto")
    assert set(dtypes) == {torch.bfloat16}
    assert measured.calls == [(6, False)]  # both guidance branches of 3 images in one call
    measured.speedup = 0.8
    pipe.to(dtype=torch.bfloat16)  # a network stored in bf16 runs as it is
    assert pipe.fastest_precision(6) == "fp32" and len(measured.calls) == 1


def test_trainer_auto_trains_in_the_measured_precision_and_a_resumed_run_keeps_it(measured, tmp_path):
    from matryoshka.training import train

    config = tiny_config(["checkpoint.every=2", "optim.precision=auto"])
    train(config, tmp_path / "run", max_steps=2)
    assert measured.calls == [(8, True)]  # the final model's training step at the batch size
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*")).joinpath("state.json").read_text())
    assert state["precision"] == "bf16"
    measured.speedup = 0.5  # the machine would now choose fp32: the run keeps what it started with
    dtypes = []
    import matryoshka.training.loop as loop

    original = loop.multi_resolution_loss

    def spy(predictions, *args, **kwargs):
        dtypes.extend(p.dtype for p in predictions)
        return original(predictions, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "multi_resolution_loss", spy)
        result = train(config, tmp_path / "run", resume=True)
    assert result.step == 4 and dtypes and set(dtypes) == {torch.bfloat16}
    assert len(measured.calls) == 1
    assert Path(tmp_path / "run" / "model").is_dir()
