"""benchmarks/versus_official.py builds the official code's config dataclasses from its YAML."""

from __future__ import annotations

import dataclasses
import enum

from helpers import load_benchmark


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
    build_dataclass = load_benchmark("versus_official").build_dataclass
    built = build_dataclass(
        Outer, {"inner": {"channels": [16, 32], "schedule": "DEEPFLOYD"}, "steps": 50, "name": "ignored"})
    assert built == Outer(Inner([16, 32], Schedule.DEEPFLOYD), 50)
    assert build_dataclass(Outer, {}) == Outer()  # what the YAML leaves out keeps its default
