"""precision="auto": the faster of float32 and bf16 autocast for one network on this machine.

On CUDA the answer is a rule (bf16 where the card supports it: its low-precision kernels are the fast
ones). On a CPU it depends on the model: bf16 convolutions are faster on a CPU with AVX512-BF16 or AMX,
but small matmuls, casts and some normalisation passes are slower, so which wins changes with the
layers, widths and batch (BENCHMARKS.md, "Every architecture a user brings"). There it is measured: a
few interleaved calls of the network on synthetic inputs of the real shapes in both precisions, the
median ratio decides, and the answer is cached per network, rows, pass (sampling or training) and
machine in ``$MATRYOSHKA_CACHE/precision.json`` (default ``~/.cache/matryoshka``); delete that file to
measure again (a measurement taken while other jobs held the CPU can pick float32). A CPU without
bf16 hardware always gets float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from matryoshka.atomic import atomic_path
from matryoshka.models import ModelConfig, NestedUNet
from matryoshka.models.memory_format import set_memory_format, with_memory_format

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# bf16 is chosen only when it is at least this much faster: below that, float32's exact arithmetic wins.
MIN_SPEEDUP = 1.05
TEXT_TOKENS = 32  # caption length of the synthetic text states the measurement uses


def resolve_precision(precision: str, model: NestedUNet | ModelConfig | None, device: torch.device | str,
                      rows: int, train: bool = False, cache_dir: str | os.PathLike[str] | None = None,
                      channels_last: bool | None = None) -> str:
    """`precision` itself unless it is "auto"; then "bf16" or "fp32" for `model` called on `rows` rows
    (one forward, or forward + backward when `train`) on `device`. `model` may be a ModelConfig: a
    network is then built only if the answer has to be measured, in `channels_last` if asked (a
    network's own memory format is read from its weights). `model` may be None off the CPU (the answer
    there is a rule)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cpu" or not cpu_has_bf16() or model is None:
        return "fp32"
    config = model if isinstance(model, ModelConfig) else model.config
    if channels_last is None:
        channels_last = not isinstance(model, ModelConfig) and _is_channels_last(model)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = measurement_key(config, channels_last, rows, train)
    known = _read_cache(cache).get(key)
    if known is None:
        network = _probe(config, train, channels_last) if isinstance(model, ModelConfig) else model
        speedup = bf16_speedup(network, rows, train)
        known = {"speedup": round(speedup, 3), "precision": "bf16" if speedup >= MIN_SPEEDUP else "fp32",
                 "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_cache(cache, key, known)
    return known["precision"]


def _probe(config: ModelConfig, train: bool, channels_last: bool) -> NestedUNet:
    """A network of `config` to measure (random weights; the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        network = NestedUNet(config).train(train)
    return set_memory_format(network, torch.channels_last) if channels_last else network


def cpu_has_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU (AVX-512, natively with AVX512-BF16 or AMX); without it
    bf16 is emulated element by element and never pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_cache_dir() -> Path:
    """``$MATRYOSHKA_CACHE``, or ``~/.cache/matryoshka``."""
    base = os.environ.get("MATRYOSHKA_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "matryoshka"


def measurement_key(config: ModelConfig, channels_last: bool, rows: int, train: bool) -> str:
    """What the measured answer depends on: the architecture, its memory format, the rows, the pass and
    the machine (CPU model, threads, torch)."""
    described = {
        "model": asdict(config), "channels_last": channels_last, "rows": rows, "train": train,
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def bf16_speedup(model: NestedUNet, rows: int, train: bool, rounds: int = 5,
                 timer: Callable[[], float] = time.perf_counter) -> float:
    """Median over `rounds` of (float32 time / bf16 autocast time) of one call of `model` on `rows`
    synthetic rows, the two precisions taking turns after a warm-up call each. The global random state
    and the parameters' gradients are left as they were."""
    ratios = []
    # Sampling keeps autocast's weight casts from call to call (pipeline._casts_kept_across_steps): so
    # does the measurement of a sampling call. Training casts its changing weights at every step.
    kept_casts = contextlib.nullcontext() if train else torch.autocast("cpu", enabled=False)
    with torch.random.fork_rng(devices=[]), kept_casts:
        call = _synthetic_call(model, rows, train)
        call(False), call(True)  # warm-up: kernel choice, allocations, autocast's weight casts
        for _ in range(rounds):
            start = timer()
            call(False)
            middle = timer()
            call(True)
            ratios.append((middle - start) / max(timer() - middle, 1e-9))
    return statistics.median(ratios)


def _synthetic_call(model: NestedUNet, rows: int, train: bool) -> Callable[[bool], None]:
    """A call of `model` on noise of its level shapes with zero conditioning, in bf16 autocast or not;
    with `train` a backward through it too, the gradients cleared after."""
    config = model.config
    device = next(model.parameters()).device
    memory_format = torch.channels_last if _is_channels_last(model) else torch.contiguous_format
    pyramid = [with_memory_format(torch.randn(rows, *shape, device=device), memory_format)
               for shape in config.level_shapes()]
    t = torch.full((rows,), 500, device=device, dtype=torch.long)
    conditioning: dict[str, torch.Tensor] = {}
    if config.num_classes > 0:
        conditioning["labels"] = torch.zeros(rows, dtype=torch.long, device=device)
    if config.text_dim > 0:
        conditioning["text_states"] = torch.randn(rows, TEXT_TOKENS, config.text_dim, device=device)
        conditioning["text_mask"] = torch.ones(rows, TEXT_TOKENS, dtype=torch.long, device=device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    had_grads = [p.grad for p in parameters]

    def call(bf16: bool) -> None:
        with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = model(pyramid, t, **conditioning)
        if train:
            sum(out.float().square().mean() for out in outputs).backward()
            for p, grad in zip(parameters, had_grads, strict=True):
                p.grad = grad

    return call


def _is_channels_last(model: NestedUNet) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_cache(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / "precision.json").read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _write_cache(cache_dir: Path, key: str, entry: dict) -> None:
    entries = {**_read_cache(cache_dir), key: entry}
    try:
        with atomic_path(cache_dir / "precision.json") as temporary:
            temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache: the answer is still used, only measured again next time


__all__ = ["MIN_SPEEDUP", "PRECISIONS", "bf16_speedup", "cpu_has_bf16", "cpu_name", "resolve_precision"]
