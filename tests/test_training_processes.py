"""Training in real processes: SIGKILL then --resume, and torchrun with 2 ranks (DDP and FSDP, gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from matryoshka.training import train
from matryoshka.training.checkpoint import find_latest, step_of
from matryoshka.training.testing import tiny_config, tiny_config_dict

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the CPU is shared


def write_config(path: Path, overrides: list[str]) -> Path:
    path.write_text(yaml.safe_dump(tiny_config_dict(overrides)), encoding="utf-8")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "matryoshka.cli", "train", *args]


def checkpoint_tensors(run: Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    directory = run / "checkpoints" / f"step-{step:07d}"
    return {stem: load_file(directory / f"{stem}.safetensors") for stem in ("model", "ema", "optimizer")}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path: Path):
    """matryoshka train is killed with SIGKILL after its first checkpoint, then resumed with --resume: its
    final weights, EMA and optimizer state equal (bitwise) those of an uninterrupted run.

    Slow: two fresh `matryoshka train` processes (each imports torch and builds an optimizer, which
    imports torch._dynamo): ~10 s on an idle 2-core CPU, 20-30 s on a busy one."""
    # Stage 1 is 3 steps, stage 2 practically endless: the run is killed right after its first
    # checkpoint (step 2, inside stage 1), so the resumed run must also cross the stage boundary.
    overrides = ["stages=[{levels: 1, steps: 3}, {levels: 2, steps: 100000}]", "checkpoint.every=2",
                 "logging.sample_count=0"]
    config = write_config(tmp_path / "run.yaml", overrides)
    target = 7
    killed = tmp_path / "killed"
    victim = subprocess.Popen(
        cli(str(config), "--out", str(killed)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "latest").exists():
        assert victim.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    latest = find_latest(killed / "checkpoints")
    assert latest is not None and 2 <= step_of(latest) < target

    resumed = subprocess.Popen(  # no CONFIG: --resume reads the run's own DIR/config.yaml
        cli("--out", str(killed), "--resume", "--max-steps", str(target)), env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Meanwhile the uninterrupted reference, in this process (the trajectory does not depend on
    # --max-steps, nor on the process it runs in).
    torch.set_num_threads(1)
    train(tiny_config(overrides), tmp_path / "reference", max_steps=target)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"resumed from {latest}" in stdout

    ours, theirs = checkpoint_tensors(killed, target), checkpoint_tensors(tmp_path / "reference", target)
    for stem in ("model", "ema", "optimizer"):
        assert ours[stem].keys() == theirs[stem].keys()
        for name, value in theirs[stem].items():
            assert torch.equal(ours[stem][name], value), f"{stem}: {name}"
    assert load_file(killed / "model" / "model.safetensors").keys() == ours["ema"].keys()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RANK_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from safetensors.torch import save_file
from matryoshka.training import train
from matryoshka.training.testing import tiny_config

out = sys.argv[1]
dist.init_process_group("gloo")  # one group for both runs (train() leaves a caller's group alone)
for strategy in ("ddp", "fsdp"):
    result = train(tiny_config(["distributed=" + strategy, "logging.sample_count=0"]), os.path.join(out, strategy))
    state = result.model.state_dict()
    if strategy == "fsdp":
        state = {k: v.to_local() for k, v in state.items()}  # this rank's shard of every parameter
    save_file({k: v.detach().contiguous() for k, v in state.items()},
              os.path.join(out, strategy, "rank-%s.safetensors" % os.environ["RANK"]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_global_batch(tmp_path: Path):
    """torchrun, 2 processes, gloo: 2 stages of 2 steps, global batch 8 (4 per rank), with DDP and FSDP.

    Slow: torchrun starts an agent and two workers that each import torch (and FSDP's DTensor stack):
    ~12 s on an idle 2-core CPU, 25-30 s on a busy one."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT, encoding="utf-8")
    launched = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    torch.set_num_threads(1)
    single = train(tiny_config(["logging.sample_count=0"]), tmp_path / "single")  # meanwhile, in this process
    output = launched.communicate(timeout=300)[0].decode()
    assert launched.returncode == 0, output[-3000:]
    assert "x 2 process(es)" in output

    # DDP: both ranks hold the same weights, equal to the single-process run's up to float rounding.
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"rank-{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    expected = checkpoint_tensors(tmp_path / "single", 4)
    for strategy in ("ddp", "fsdp"):
        got = checkpoint_tensors(tmp_path / strategy, 4)
        for stem in ("model", "ema", "optimizer"):
            assert got[stem].keys() == expected[stem].keys()
            for name, value in expected[stem].items():
                assert torch.allclose(got[stem][name], value, atol=2e-5), f"{strategy} {stem}: {name}"
    assert all(torch.allclose(rank0[k], v, atol=2e-5) for k, v in single.model.state_dict().items())
    # FSDP: each rank holds only its shard of every parameter.
    shards = [load_file(tmp_path / "fsdp" / f"rank-{r}.safetensors") for r in (0, 1)]
    weight = "conv_in.weight"
    assert shards[0][weight].shape[0] + shards[1][weight].shape[0] == expected["model"][weight].shape[0]
    assert tiny_config().data.batch_size == 8
