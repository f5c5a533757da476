"""Numerical faults in training: a step whose loss or gradients are NaN/inf is skipped whole (weights,
optimizer state and EMA untouched) and counted; optim.max_nonfinite_steps such steps in a row stop the
run with a message naming the step, and the last checkpoint stays clean and resumable.

Faults are injected by wrapping the trainer's loss function: selected steps get a NaN or inf loss, or
a finite loss whose backward pass yields inf gradients (what a bf16 overflow or a poisoned sample does).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka.cli import main
from matryoshka.losses import LossOutput
from matryoshka.training import loop, read_metrics, train
from matryoshka.training.checkpoint import find_latest, step_of
from matryoshka.training.config import TrainConfig
from matryoshka.training.loop import NonFiniteLossError
from matryoshka.training.testing import tiny_config, tiny_config_dict
from matryoshka.typed_config import ConfigError, from_dict

STEMS = ("model", "ema", "optimizer")
ONE_STAGE = ["stages=[{levels: 2, steps: 6}]", "checkpoint.every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _InfGradient(torch.autograd.Function):
    """Identity forward; the backward pass returns inf: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def poison(kind: str, steps: set[int]):
    """A stand-in for loop.diffusion_loss that spoils the loss of the given (1-based) steps."""
    real = loop.diffusion_loss
    calls = [0]

    def patched(*args, **kwargs) -> LossOutput:
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] not in steps:
            return out
        if kind == "inf-gradient":
            return LossOutput(_InfGradient.apply(out.total), out.per_level)
        bad = {"nan": math.nan, "inf": math.inf}[kind]
        return LossOutput(out.total + bad, [level + bad for level in out.per_level])

    return patched


def tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    directory = run / "checkpoints" / f"step-{step:07d}"
    return {stem: load_file(directory / f"{stem}.safetensors") for stem in STEMS}


def assert_same(a: dict, b: dict) -> None:
    for stem in STEMS:
        assert a[stem].keys() == b[stem].keys()
        for name, value in a[stem].items():
            assert torch.equal(value, b[stem][name]), f"{stem}: {name} changed"


def assert_finite(checkpoint: dict) -> None:
    for stem in STEMS:
        for name, value in checkpoint[stem].items():
            assert torch.isfinite(value.float()).all(), f"{stem}: {name} is not finite"


@pytest.mark.parametrize("kind", ["nan", "inf", "inf-gradient"])
def test_a_nonfinite_step_is_skipped_whole_and_counted(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(loop, "diffusion_loss", poison(kind, {3, 4}))
    run = tmp_path / "run"
    result = train(tiny_config(ONE_STAGE + ["optim.max_nonfinite_steps=3"]), run)
    assert result.step == 6  # two bad steps in a row, below the limit of 3: the run went on

    # Steps 3 and 4 changed nothing: weights, AdamW moments and step count, EMA.
    before, after_3, after_4 = (tensors(run, s) for s in (2, 3, 4))
    assert_same(before, after_3)
    assert_same(before, after_4)
    # Step 5 is an ordinary update again.
    after_5 = tensors(run, 5)
    assert not torch.equal(after_5["model"]["conv_in.weight"], before["model"]["conv_in.weight"])
    assert_finite(tensors(run, 6))

    records = {r["step"]: r for r in read_metrics(run)}
    assert [s for s, r in records.items() if r.get("skipped_steps")] == [3, 4]
    assert all(math.isfinite(records[s]["grad_norm"]) for s in records)


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "diffusion_loss", poison("nan", {2, 4, 5, 6}))
    run = tmp_path / "run"
    config = tiny_config(["stages=[{levels: 2, steps: 8}]", "checkpoint.every=1", "optim.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteLossError) as info:
        train(config, run)
    message = str(info.value)
    for part in ("stopped at step 6", "3 steps in a row", "steps 4..6", "optim.max_nonfinite_steps=3",
                 "step-0000005"):
        assert part in message, message

    # Step 6 was not checkpointed; every checkpoint is clean, and 3..5 equal the last update (step 3).
    latest = find_latest(run / "checkpoints")
    assert step_of(latest) == 5
    for step in range(1, 6):
        assert_finite(tensors(run, step))
    assert_same(tensors(run, 3), tensors(run, 5))

    # Once the cause is gone, the run resumes from that checkpoint and finishes.
    monkeypatch.undo()
    result = train(config, run, resume=True)
    assert result.step == 8
    assert_finite(tensors(run, 8))


def test_the_command_line_reports_the_stop_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "diffusion_loss", poison("inf", set(range(1, 100))))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(["stages=[{levels: 2, steps: 5}]"])), encoding="utf-8")
    code = main(["train", str(path), "--out", str(tmp_path / "run"), "--set", "optim.max_nonfinite_steps=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "matryoshka train: stopped: stopped at step 2" in err and "NaN/inf" in err and "Traceback" not in err


@pytest.mark.parametrize("value", [0, -1, 1.5, "many", None])
def test_max_nonfinite_steps_is_validated(value):
    raw = tiny_config_dict()
    raw["optim"]["max_nonfinite_steps"] = value
    with pytest.raises(ConfigError, match=r"^optim\.max_nonfinite_steps"):
        from_dict(TrainConfig, raw)
