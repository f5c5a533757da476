"""Damage found, not trusted: checkpoints damaged after they were written are detected at resume and the
newest intact one is used; a full disk during the export or the metrics log is one line, and resumable."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from matryoshka import cli
from matryoshka.training import train
from matryoshka.training.checkpoint import damage, find_intact
from matryoshka.training.testing import tiny_config, tiny_config_dict
from matryoshka.typed_config import dump_yaml

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EVERY_STEP = ["checkpoint.every=1", "checkpoint.keep_last=10", "logging.sample_count=0", "logging.progress=false"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(tiny_config(EVERY_STEP), tmp_path_factory.mktemp("whole"), quiet=True)


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm", ["truncate", "flip", "state"])
def test_a_damaged_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, uninterrupted, capsys, harm):
    run = tmp_path / "run"
    train(tiny_config(EVERY_STEP), run, max_steps=3, quiet=True)
    newest = run / "checkpoints" / "step-0000003"
    if harm == "truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif harm == "flip":
        flip_byte(newest / "ema.safetensors")  # same size, other bytes
    else:
        text = (newest / "state.json").read_text()
        (newest / "state.json").write_text(text.replace('"samples_seen": 24', '"samples_seen": 25'))
    assert damage(newest) is not None
    found, skipped = find_intact(run / "checkpoints")
    assert found.name == "step-0000002" and [p.name for p, _ in skipped] == ["step-0000003"]
    resumed = train(tiny_config(EVERY_STEP), run, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "skipped the damaged checkpoint" in err and "step-0000003" in err and "step-0000002" in err
    for key, value in uninterrupted.ema_model.state_dict().items():  # the same run as if nothing happened
        assert torch.equal(value, resumed.ema_model.state_dict()[key]), key


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_yaml(tiny_config_dict(EVERY_STEP)))
    return path


def test_a_full_disk_during_the_export_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import matryoshka.training.loop as loop

    config, run = write_config(tmp_path), tmp_path / "run"
    real = loop.save_model_dir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_model_dir", full)
    assert cli.main(["train", str(config), "--out", str(run), "--max-steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setattr(loop, "save_model_dir", real)
    assert cli.main(["train", str(config), "--out", str(run), "--resume", "--quiet"]) == 0
    assert (run / "model" / "config.yaml").is_file()


def test_a_metrics_log_that_cannot_be_written_is_one_line_and_the_run_resumes(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    assert cli.main(["train", str(config), "--out", str(run), "--max-steps", "1", "--quiet"]) == 0
    log = run / "metrics.jsonl"
    log.unlink()
    log.mkdir()  # appending to it fails like a full disk does: an OSError
    assert cli.main(["train", str(config), "--out", str(run), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "--resume" in err and "Traceback" not in err
    log.rmdir()
    assert cli.main(["train", str(config), "--out", str(run), "--resume", "--quiet"]) == 0
