"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared (forked processes inherit it).
    Files that train or time tiny models use it for every test: pytestmark = usefixtures("one_thread").
    Module-scoped so that it is in force before the module's own fixtures train (a run trained on two
    threads and resumed on one differs in the last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def precision_cache(tmp_path_factory):
    """precision="auto" measures once per model and machine and caches the answer; tests keep that cache
    out of the user's home (one per test session)."""
    import matryoshka.precision

    directory = tmp_path_factory.mktemp("precision-cache")
    original = matryoshka.precision.default_cache_dir
    matryoshka.precision.default_cache_dir = lambda: directory
    yield directory
    matryoshka.precision.default_cache_dir = original
