"""Training killed with SIGKILL at many points (mid-step, mid-file, between files, before `latest`,
mid-prune, mid-export, during a resumed run's re-write, and at random moments) always resumes from its
last complete checkpoint to exactly the weights of an uninterrupted run; a checkpoint directory with a
final name is never incomplete; a failed write (disk full) keeps the previous checkpoint and says so.

The victims are forked from this process (torch is already imported, so each costs a fraction of a
second, not an interpreter start) and SIGKILL themselves at the chosen point, through a patch installed
in the child only: nothing runs after the kill (no `finally`, no atexit), exactly as with `kill -9`.
The random kills are sent from outside, at seeded random moments.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import signal
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka.cli import main
from matryoshka.model_dir import load_model_dir
from matryoshka.training import checkpoint as ckpt
from matryoshka.training import loop, read_metrics, train
from matryoshka.training.checkpoint import CheckpointWriteError, find_latest, step_of
from matryoshka.training.testing import tiny_config, tiny_config_dict

# Stage 1 (8 px) is steps 1..3, stage 2 (16 over 8 px) is practically endless, so a victim never
# finishes by itself; resumed runs stop at TARGET. Checkpoints: 2, 3 (end of stage 1), 4, 6.
OVERRIDES = [
    "stages=[{levels: 1, steps: 3}, {levels: 2, steps: 100000}]", "checkpoint.every=2", "checkpoint.keep_last=2",
]
TARGET = 6
STEMS = ("model", "ema", "optimizer")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config():
    return tiny_config(OVERRIDES)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Checkpoint TARGET of an uninterrupted run, and its exported models."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    train(config(), out, max_steps=TARGET)
    tensors = checkpoint_tensors(out, TARGET)
    tensors["export"] = load_file(out / "model" / "model.safetensors")
    tensors["stage-1"] = load_file(out / "stages" / "stage-1" / "model.safetensors")
    return tensors


def checkpoint_tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    directory = run / "checkpoints" / f"step-{step:07d}"
    return {stem: load_file(directory / f"{stem}.safetensors") for stem in STEMS}


# ------------------------------------------------------------------------------------------------
# Kill points: each installs, in the forked child only, a patch that SIGKILLs the process there.
def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_loss_call(n: int) -> Callable[[], None]:
    """Die inside training step n (1-based), before its update."""

    def install() -> None:
        real, calls = loop.diffusion_loss, [0]

        def patched(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return real(*args, **kwargs)

        loop.diffusion_loss = patched

    return install


def kill_in_tensor_file(step: int, stem: str, half_written: bool) -> Callable[[], None]:
    """Die while writing `stem`.safetensors of checkpoint `step`: half of its bytes on disk, or none."""

    def install() -> None:
        real = ckpt.save_file

        def patched(tensors, path, *args, **kwargs):
            if f"step-{step:07d}" in path and path.endswith(f"/{stem}.safetensors"):
                if half_written:
                    real(tensors, path, *args, **kwargs)
                    os.truncate(path, os.path.getsize(path) // 2)
                die()
            return real(tensors, path, *args, **kwargs)

        ckpt.save_file = patched

    return install


def kill_in_state_json(step: int) -> Callable[[], None]:
    """Die with half of state.json of checkpoint `step` written (and flushed)."""

    def install() -> None:
        real_json = ckpt.json

        def dump(obj, handle, **kwargs):
            if obj.get("step") == step:
                text = real_json.dumps(obj, **kwargs)
                handle.write(text[: len(text) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                die()
            return real_json.dump(obj, handle, **kwargs)

        ckpt.json = types.SimpleNamespace(dump=dump, dumps=real_json.dumps, loads=real_json.loads)

    return install


def kill_in_latest_pointer(step: int) -> Callable[[], None]:
    """Die after checkpoint `step` got its final name, while `latest` is being replaced (temp file half
    written, not yet renamed)."""

    def install() -> None:
        real = ckpt.atomic_write_text

        def patched(path, text):
            if text.strip() == f"step-{step:07d}":
                partial = Path(path).with_name(f".{Path(path).name}.killed.tmp")
                partial.write_text(text[:3])
                die()
            return real(path, text)

        ckpt.atomic_write_text = patched

    return install


def kill_in_prune(victim: int) -> Callable[[], None]:
    """Die while old checkpoint `victim` is being deleted, with one of its files already gone."""

    def install() -> None:
        real = ckpt.shutil.rmtree

        def patched(path, *args, **kwargs):
            path = Path(path)
            if f"step-{victim:07d}" in path.name and path.is_dir():
                (path / "model.safetensors").unlink()
                die()
            return real(path, *args, **kwargs)

        ckpt.shutil.rmtree = patched

    return install


def kill_in_rewrite_swap(step: int) -> Callable[[], None]:
    """A resumed run writes checkpoint `step` again: die after the old copy was moved aside, before
    the new one takes its name."""

    def install() -> None:
        real = os.rename

        def patched(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            if Path(dst).name.startswith(f".tmp-old-step-{step:07d}"):
                die()

        ckpt.os.rename = patched  # checkpoint.os is the os module: only this child is affected

    return install


def kill_in_export(name: str, levels: int) -> Callable[[], None]:
    """Die while DIR/model or DIR/stages/<name> gets the EMA model of `levels` levels: weights written,
    config.yaml not (it still describes the previous stage's model, if any)."""

    def install() -> None:
        real = loop.save_model_dir

        def patched(directory, model, mdm, card=None):
            if Path(directory).name == name and mdm.model.num_levels == levels:
                from matryoshka.model_dir import save_state_dict

                save_state_dict(model.state_dict(), Path(directory) / "model.safetensors")
                die()
            return real(directory, model, mdm, card)

        loop.save_model_dir = patched

    return install


def _victim(out: str, install: Callable[[], None] | None, max_steps: int | None) -> None:
    if install is not None:
        install()
    train(config(), out, resume=True, max_steps=max_steps)


def run_victim(out: Path, install: Callable[[], None] | None, max_steps: int | None = None) -> None:
    """Fork a training process that kills itself at `install`'s point; it must die of SIGKILL."""
    process = multiprocessing.get_context("fork").Process(target=_victim, args=(str(out), install, max_steps))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL, f"the victim was not killed (exit code {process.exitcode})"


# ------------------------------------------------------------------------------------------------
# What must hold after every kill, and after the resume.
def assert_no_incomplete_checkpoint(run: Path) -> None:
    """Every directory with a checkpoint name is complete and loads; `latest` never names a temporary."""
    root = run / "checkpoints"
    for path in root.iterdir() if root.is_dir() else []:
        if step_of(path) is not None:
            assert ckpt.is_complete(path), f"{path.name} has a final name but is incomplete: {os.listdir(path)}"
            for stem in STEMS:
                load_file(path / f"{stem}.safetensors")
    latest = find_latest(root)
    assert latest is None or step_of(latest) is not None


def resume_and_compare(run: Path, reference: dict, expected_start: int | None, capsys) -> None:
    latest = find_latest(run / "checkpoints")
    assert (step_of(latest) if latest else None) == expected_start
    capsys.readouterr()
    result = train(config(), run, resume=True, max_steps=TARGET)
    said = capsys.readouterr().out
    if expected_start is None:
        assert "resumed from" not in said
    else:
        assert f"resumed from {latest}" in said
    assert result.step == TARGET
    got = checkpoint_tensors(run, TARGET)
    for stem in STEMS:
        assert got[stem].keys() == reference[stem].keys()
        for name, value in reference[stem].items():
            assert torch.equal(got[stem][name], value), f"{stem}: {name} differs from the uninterrupted run"
    for export, directory in (("export", run / "model"), ("stage-1", run / "stages" / "stage-1")):
        model, _ = load_model_dir(directory)  # complete: config.yaml and weights that match it
        for name, value in reference[export].items():
            assert torch.equal(model.state_dict()[name], value), f"{directory}: {name}"
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers, f"temporary directories left behind: {leftovers}"
    assert_no_incomplete_checkpoint(run)


KILL_POINTS = [
    # (id, kill point, the checkpoint the resumed run must start from, a name on disk that shows the kill
    # came in the middle of a write, the victim's --max-steps)
    ("step-1-before-any-checkpoint", kill_at_loss_call(1), None, None, None),
    ("mid-step-5", kill_at_loss_call(5), 4, None, None),
    ("half-of-model.safetensors-of-step-4", kill_in_tensor_file(4, "model", True), 3, ".tmp-step-0000004-", None),
    ("ema-written-optimizer-not-of-step-3", kill_in_tensor_file(3, "optimizer", False), 2, ".tmp-step-0000003-", None),
    ("half-of-state.json-of-step-4", kill_in_state_json(4), 3, ".tmp-step-0000004-", None),
    ("step-4-renamed-latest-not-updated", kill_in_latest_pointer(4), 3, "step-0000004", None),
    ("pruning-step-2", kill_in_prune(2), 4, ".tmp-pruned-step-0000002-", None),
    ("exporting-stage-1", kill_in_export("stage-1", 1), 3, None, None),
    ("exporting-the-final-model", kill_in_export("model", 2), TARGET, None, TARGET),
]


@pytest.mark.parametrize(
    ("install", "start", "on_disk", "max_steps"), [k[1:] for k in KILL_POINTS], ids=[k[0] for k in KILL_POINTS]
)
def test_killed_at_a_point_resumes_from_the_last_complete_checkpoint(
    tmp_path, reference, capsys, install, start, on_disk, max_steps
):
    run = tmp_path / "run"
    run_victim(run, install, max_steps)
    if on_disk is not None:  # the kill really came in the middle of that write
        assert any(p.name.startswith(on_disk) for p in (run / "checkpoints").iterdir())
    assert_no_incomplete_checkpoint(run)
    resume_and_compare(run, reference, start, capsys)


def test_killed_again_while_a_resumed_run_rewrites_a_checkpoint(tmp_path, reference, capsys):
    """Step 4 got its name but `latest` still says 3; the resumed run writes step 4 again and is killed
    after moving the old copy aside: the third run still finds step 3 and ends on the same weights."""
    run = tmp_path / "run"
    run_victim(run, kill_in_latest_pointer(4))
    assert find_latest(run / "checkpoints").name == "step-0000003"
    run_victim(run, kill_in_rewrite_swap(4))
    assert any(p.name.startswith(".tmp-old-step-0000004") for p in (run / "checkpoints").iterdir())
    assert_no_incomplete_checkpoint(run)
    resume_and_compare(run, reference, 3, capsys)


def test_killed_from_outside_at_random_moments(tmp_path, reference, capsys):
    """Two kill -9 at seeded random moments (after a random number of logged steps plus a random delay),
    the second one during the resumed run; then the run is finished and compared."""
    rng = random.Random(1234)
    run = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    for _ in range(2):
        logged = len(read_metrics(run))
        wait_for = logged + rng.randint(1, 2)
        process = context.Process(target=_victim, args=(str(run), None, None))
        process.start()
        deadline = time.monotonic() + 120
        while len(read_metrics(run)) < wait_for:
            assert process.is_alive(), f"the victim ended by itself (exit code {process.exitcode})"
            assert time.monotonic() < deadline, "the victim made no progress in 120 s"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        assert process.exitcode == -signal.SIGKILL
        assert_no_incomplete_checkpoint(run)
    latest = find_latest(run / "checkpoints")
    resume_and_compare(run, reference, step_of(latest) if latest else None, capsys)


# ------------------------------------------------------------------------------------------------
# A write that fails (disk full) keeps the previous checkpoint and says so.
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch, reference, capsys):
    real = ckpt.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "step-0000004" in path and path.endswith("/ema.safetensors"):
            real(tensors, path, *args, **kwargs)
            os.truncate(path, 100)  # what a full disk leaves: the start of the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as info:
        train(config(), run, max_steps=TARGET)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    for part in ("could not write checkpoint step-0000004", "No space left on device",
                 "the last complete checkpoint is still step-0000003", "--resume"):
        assert part in message, message
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"], "a partial checkpoint was left behind"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert_no_incomplete_checkpoint(run)

    # The command line reports it in one line and exits 1 ...
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config_dict(OVERRIDES)), encoding="utf-8")
    capsys.readouterr()
    code = main(["train", str(config_path), "--out", str(tmp_path / "cli"), "--max-steps", str(TARGET)])
    err = capsys.readouterr().err
    assert code == 1
    assert "matryoshka train: stopped: " in err and "No space left on device" in err and "Traceback" not in err

    # ... and once there is space again, --resume ends exactly where an uninterrupted run does.
    monkeypatch.setattr(ckpt, "save_file", real)
    resume_and_compare(run, reference, 3, capsys)
