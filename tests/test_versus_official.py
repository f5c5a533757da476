"""benchmarks/versus_official.py builds the official code's config dataclasses from its YAML."""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("versus_official", ROOT / "benchmarks" / "versus_official.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["versus_official"] = module
    spec.loader.exec_module(module)
    return module


class Schedule(enum.Enum):
    DEEPFLOYD = 1
    SQUAREDCOS = 2


@dataclasses.dataclass
class Inner:
    channels: list = dataclasses.field(default_factory=lambda: [8])
    schedule: Schedule = Schedule.SQUAREDCOS


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 1000


def test_nested_dataclasses_and_enums_come_from_their_field_types():
    built = load_benchmark().build_dataclass(
        Outer, {"inner": {"channels": [16, 32], "schedule": "DEEPFLOYD"}, "steps": 50, "name": "ignored"})
    assert built == Outer(Inner([16, 32], Schedule.DEEPFLOYD), 50)
    assert load_benchmark().build_dataclass(Outer, {}) == Outer()  # what the YAML leaves out keeps its default
