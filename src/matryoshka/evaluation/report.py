"""Evaluation reports: a JSON file of results and PNG plots (FID versus steps, per-class accuracy).

Plots use matplotlib's object API with the Agg canvas directly, so no GUI backend is needed and the
caller's global pyplot/backend state is left untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka.atomic import atomic_write_text

__all__ = ["plot_bars", "plot_curves", "to_jsonable", "write_json_report"]


def to_jsonable(value: Any) -> Any:
    """Turn numpy/torch values, paths, dataclasses and tuples into plain JSON types (recursively).

    Non-finite floats become None (JSON has no NaN), so the file stays readable by strict parsers.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "_asdict"):  # NamedTuple, e.g. PrecisionRecall
        return to_jsonable(value._asdict())
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write a {type(value).__name__} into a JSON report")


def write_json_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` (see ``to_jsonable`` for what values may be) as indented JSON; returns the path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(to_jsonable(report), indent=2, sort_keys=True) + "\n")
    return path


def _new_figure(width: float = 6.4, height: float = 4.0) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib (or 'matryoshka-diffusion[eval]')") from error
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    ylabel: str,
    xlabel: str = "training step",
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """One line per run: ``{name: [(step, value), ...]}`` -> PNG at ``path`` (e.g. FID versus steps).

    Points are sorted by step; a run with one point shows as a marker.
    """
    if not curves:
        raise ValueError("no curves to plot")
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, points in curves.items():
        if len(points) == 0:
            raise ValueError(f"curve {name!r} has no points")
        try:
            ordered = sorted((float(x), float(y)) for x, y in points)
        except (TypeError, ValueError) as error:
            raise ValueError(f"curve {name!r} must be a sequence of (step, value) pairs: {error}") from error
        xs, ys = zip(*ordered, strict=True)
        axes.plot(xs, ys, marker="o", markersize=3, label=name)
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_bars(
    values: Mapping[Any, float],
    path: str | Path,
    ylabel: str,
    title: str | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Bar chart of ``{key: value}`` (e.g. per-class conditioning accuracy) -> PNG at ``path``.

    ``names``: labels for integer keys (e.g. Fashion-MNIST class names); default: the keys.
    """
    if not values:
        raise ValueError("no values to plot")
    keys = list(values)
    labels = [names[key] if names is not None and isinstance(key, int) else str(key) for key in keys]
    figure = _new_figure(width=max(6.4, 0.6 * len(keys)))
    axes = figure.add_subplot()
    axes.bar(range(len(keys)), [float(values[key]) for key in keys])
    axes.set_xticks(range(len(keys)), labels, rotation=45 if len(keys) > 6 else 0, ha="right")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, path)


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a .png path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
