"""matryoshka.cpu_allocator: freed CPU memory is kept for the next step (no page faults per step)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from matryoshka.training import loop
from matryoshka.training.config import OptimConfig
from matryoshka.training.testing import tiny_config

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A few conv/GroupNorm layers trained at batch 32 (16 MB activations): the allocation pattern of a
# training step. Prints the minor page faults per step, after warm-up, in a fresh process (malloc's
# settings are process-wide, so the measurement cannot share the test process).
SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "keep":
        from matryoshka.cpu_allocator import keep_freed_memory
        assert keep_freed_memory() and keep_freed_memory()  # applied, and idempotent
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((1, 8), (8, 16), (16, 32)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.GroupNorm(4, c_out), torch.nn.SiLU()]
    net = torch.nn.Sequential(*layers)
    x = torch.randn(32, 1, 64, 64)
    def step():
        net(x).square().mean().backward()
    for _ in range(10):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    """
)


def faults_per_step(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's mallopt; other C libraries are left alone")
def test_keep_freed_memory_removes_the_page_faults_of_every_step():
    default = faults_per_step("default")
    kept = faults_per_step("keep")
    # glibc's default hands the step's large blocks back to the system: thousands of faults per step.
    assert default > 1000, default
    assert kept < 0.05 * default, (kept, default)


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_its_config(keep, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    config = tiny_config([f"optim.keep_freed_memory={str(keep).lower()}", "stages=[{levels: 1, steps: 1}]"])
    loop.train(config, tmp_path / "run")
    assert calls == ([1] if keep else [])
    assert OptimConfig().keep_freed_memory is True  # on unless a config turns it off


@pytest.mark.parametrize("command, argv, applies", [
    ("generate", ["generate", "a photo of a bag", "--out", "unused.png"], True),
    ("train", ["train", "configs/fashion_tiny_32x16.yaml", "--out", "unused"], False),  # follows its config
])
def test_sampling_commands_keep_freed_memory(command, argv, applies, monkeypatch):
    import importlib

    from matryoshka import cli, cpu_allocator

    calls = []
    monkeypatch.setattr(cpu_allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    module = importlib.import_module(cli.COMMANDS[command][0])
    monkeypatch.setattr(module, "run", lambda args: 0)  # the dispatch is under test, not the command
    assert cli.main(argv) == 0
    assert calls == ([1] if applies else [])
