"""Shared pieces of the performance benchmarks (train_throughput, sampling_latency, memory, gpu_check).

Models: the tiny Fashion-MNIST presets and the official ml-mdm text-to-image architectures (the 64 px
core and the 256-over-64 model of configs/t2i_256.yaml, random weights), each beside a plain
single-resolution UNet of similar size. A training step here is the trainer's own step without its
data pipeline: `matryoshka.training.loop.diffusion_loss` on synthetic inputs, backward, and (unless
left out) the trainer's AdamW (`make_optimizer`), under the same autocast and memory-format options.

Timing helpers measure variants round-robin and report medians with their spread, because these
benchmarks usually run on a shared machine whose load changes while they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.models import ModelConfig, NestedUNet, layers
from matryoshka.models.layers import SMALL_MATMUL_MACS
from matryoshka.models.memory_format import set_memory_format, with_memory_format
from matryoshka.precision import cpu_name
from matryoshka.training import load_train_config
from matryoshka.training.config import OptimConfig
from matryoshka.training.loop import diffusion_loss
from matryoshka.training.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
TEXT_TOKENS = 32  # synthetic caption length for text-conditional models


# --------------------------------------------------------------------------------------------------
# The machine

def machine_line(device: torch.device | None = None) -> str:
    """CPU model, cores, threads, torch version, load average (and the GPU when `device` is CUDA)."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    text = (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), Python {platform.python_version()}, load average {load}"
    )
    if device is not None and device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host: {text}"
    return text


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_s(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0
) -> float:
    """Measured FLOP/s of a large square matmul (2 n^3 FLOPs each): this machine's practical peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (allocations, kernel selection)
    synchronize(device)
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return max(rates)  # the least disturbed run: the machine's capability, not its current load


def peak_runs(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (run, FLOPs per run): a large square matmul and a large 3x3 convolution, to time beside
    model steps in the same rounds; the faster of the two in a round is the machine's practical peak
    under that round's load. Both, because on AMD CPUs torch's fp32 matmul (MKL) runs far below the
    oneDNN kernels that the convolutions use, which would put a model above "100 % of peak"."""
    big = device.type == "cuda"
    n = 8192 if big else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    rows, width, side = (64, 512, 64) if big else (8, 256, 32)
    x = torch.randn(rows, width, side, side, device=device, dtype=dtype)
    w = torch.randn(width, width, 3, 3, device=device, dtype=dtype)
    runs = {
        "matmul": (lambda: torch.mm(a, b), 2 * n**3),
        "conv3x3": (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * rows * width * width * 9 * side * side),
    }
    for run, _ in runs.values():
        run()
    return runs


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention) counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------------
# The models
@dataclass
class Workload:
    """A network to benchmark and its synthetic batch."""

    name: str
    model: ModelConfig
    diffusion: DiffusionConfig
    batch: int
    note: str = ""

    @property
    def parameters(self) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in NestedUNet(self.model).parameters())


def preset_workload(preset: str, levels: int | None = None, batch: int | None = None) -> Workload:
    """configs/<preset>.yaml's model (its `levels` innermost levels; None: all) with the preset's batch."""
    config = load_train_config(ROOT / "configs" / f"{preset}.yaml")
    model = config.mdm.model if levels is None else config.mdm.model.innermost(levels)
    name = preset if levels is None else f"{preset} ({levels} level{'s' * (levels > 1)})"
    return Workload(name, model, config.mdm.diffusion, batch or config.data.batch_size)


def single_level_like(workload: Workload, channels: list[int], num_res_blocks: list[int],
                      attention_layers: list[int] | None, name: str | None = None) -> Workload:
    """A plain single-resolution UNet at the workload's top resolution, built from its core level's
    settings (attention, FFN, heads, groups, conditioning) with the given bands; no nesting, one loss."""
    core = workload.model.levels[-1]
    top = workload.model.levels[0]
    level = dataclasses.replace(
        core, channels=channels, num_res_blocks=num_res_blocks, attention_layers=attention_layers,
        micro_conditioning=dict(top.micro_conditioning), normalize_input=False,
    )
    model = dataclasses.replace(workload.model, levels=[level])
    diffusion = dataclasses.replace(workload.diffusion, level_weights=None, mixed_ratio=None)
    return Workload(name or f"single-level UNet {model.image_size} px", model, diffusion, workload.batch)


# Plain single-resolution UNets of about the nested models' sizes: the same widths, down to the same
# lowest resolution, with the core's attention at the bottom.
TINY_BASELINE = {"channels": [16, 32, 72], "num_res_blocks": [1, 1, 1], "attention_layers": [0, 0, 1]}
OFFICIAL_256_BASELINE = {
    "channels": [64, 128, 256, 512, 768], "num_res_blocks": [2, 2, 2, 2, 2], "attention_layers": [0, 0, 0, 1, 5],
}


def workloads(names: list[str], batch: int | None = None, official_batch: int = 1) -> list[Workload]:
    """Named workloads: tiny, tiny_t2i, tiny_single, official64, official256, official256_single."""
    out = []
    for name in names:
        if name == "tiny":
            out.append(preset_workload("fashion_tiny_32x16", batch=batch))
        elif name == "tiny_t2i":
            out.append(preset_workload("fashion_t2i_32x16", batch=batch))
        elif name == "tiny_single":
            base = preset_workload("fashion_tiny_32x16", batch=batch)
            out.append(single_level_like(base, **TINY_BASELINE, name="single-level UNet 32 px (tiny)"))
        elif name == "official64":
            w = preset_workload("t2i_256", levels=1, batch=official_batch)
            out.append(dataclasses.replace(w, name="official 64 px core (t2i_256 stage 1)"))
        elif name == "official256":
            w = preset_workload("t2i_256", batch=official_batch)
            out.append(dataclasses.replace(w, name="official 256/64 (t2i_256)"))
        elif name == "official256_single":
            base = preset_workload("t2i_256", batch=official_batch)
            name = "single-level UNet 256 px (official widths)"
            out.append(single_level_like(base, **OFFICIAL_256_BASELINE, name=name))
        else:
            raise ValueError(f"unknown workload {name!r}")
    return out


def synthetic_inputs(workload: Workload, device: torch.device, seed: int = 0) -> dict:
    """Clean top-level images, t, per-level noise and conditioning kwargs, on `device`."""
    model = workload.model
    generator = torch.Generator().manual_seed(seed)
    b = workload.batch
    shapes = model.level_shapes()  # (C, S, S) per level, or (C, T, S, S) for a video model
    images = torch.rand(b, *shapes[0], generator=generator) * 2 - 1
    noise = [torch.randn(b, *shape, generator=generator) for shape in shapes]
    t = torch.randint(0, 1000, (b,), generator=generator)
    conditioning: dict[str, torch.Tensor] = {}
    if model.num_classes > 0:
        conditioning["labels"] = torch.randint(0, model.num_classes + 1, (b,), generator=generator)
    if model.text_dim > 0:
        conditioning["text_states"] = torch.randn(b, TEXT_TOKENS, model.text_dim, generator=generator)
        conditioning["text_mask"] = torch.ones(b, TEXT_TOKENS, dtype=torch.long)
    move = lambda x: x.to(device)  # noqa: E731
    return {
        "images": move(images), "t": move(t), "noise": [move(x) for x in noise],
        "conditioning": {k: move(v) for k, v in conditioning.items()},
    }


# --------------------------------------------------------------------------------------------------
# Steps
@dataclass(frozen=True)
class Options:
    """How a step is computed (the trainer's optim.* options of the same names)."""

    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    channels_last: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    optimizer: str | None = "foreach"  # OptimConfig.implementation; None: forward + backward only
    grad_clip: float | None = None  # clip the global gradient norm before the optimizer, as the trainer does
    # matryoshka.cpu_allocator.keep_freed_memory (process-wide: only meaningful for a step measured in
    # its own process, see IsolatedRuns)
    keep_freed_memory: bool = False
    # every matmul in bf16 under CPU autocast, as before layers.Linear computed small ones in float32
    # (process-wide, like keep_freed_memory)
    bf16_small_matmuls: bool = False

    @property
    def label(self) -> str:
        parts = ["compile" if self.compile else "eager", self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.optimizer is not None:
            parts.append(f"{self.optimizer} AdamW")
        if self.keep_freed_memory:
            parts.append("kept memory")
        if self.bf16_small_matmuls:
            parts.append("small matmuls bf16")
        return " ".join(parts)


@dataclass
class Step:
    """A built training step: `run()` does one step; `model` is the eager module."""

    workload: Workload
    options: Options
    model: NestedUNet
    run: Callable[[], None]
    device: torch.device
    first_call_s: float = 0.0  # the first call (compilation for compiled steps, warm-up otherwise)
    extra: dict = field(default_factory=dict)


def build_model(workload: Workload, options: Options, device: torch.device, seed: int = 0) -> NestedUNet:
    layers.SMALL_MATMUL_MACS = 0 if options.bf16_small_matmuls else SMALL_MATMUL_MACS
    torch.manual_seed(seed)
    model = NestedUNet(workload.model)
    if options.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    memory_format = torch.channels_last if options.channels_last else torch.preserve_format
    return set_memory_format(model.to(device), memory_format)


def _first_call(step: Step) -> Step:
    """Run the step once (compilation, allocations, kernel choice) and record how long that took."""
    start = time.perf_counter()
    step.run()
    synchronize(step.device)
    step.first_call_s = time.perf_counter() - start
    return step


def build_train_step(
    workload: Workload, options: Options, device: torch.device, seed: int = 0, model: NestedUNet | None = None
) -> Step:
    """One training step of `workload` as the trainer computes it, on synthetic inputs. `model`: reuse
    an already built network (built with the same memory format) instead of building one."""
    model = (model if model is not None else build_model(workload, options, device, seed)).train()
    forward = torch.compile(model) if options.compile else model
    optimizer = None
    if options.optimizer is not None:
        optim_config = OptimConfig(implementation=options.optimizer)  # type: ignore[arg-type]
        optimizer = make_optimizer(model.parameters(), optim_config, 1e-4, device, sharded=False)
    schedule = PyramidSchedule.from_config(workload.diffusion, workload.model.scales).to(device)
    inputs = synthetic_inputs(workload, device, seed)
    bf16 = options.precision == "bf16"

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(
                forward, inputs["images"], workload.model.scales, inputs["t"], inputs["noise"],
                inputs["conditioning"], schedule, workload.diffusion, options.channels_last,
                time_scales=workload.model.time_scales if workload.model.num_frames else None,
            )
        loss.mean().backward()
        if options.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return _first_call(Step(workload, options, model, run, device))


def build_forward(workload: Workload, options: Options, device: torch.device, seed: int = 0,
                  batch: int | None = None, model: NestedUNet | None = None) -> Step:
    """One denoiser forward (as a sampler calls it, no gradients) of `batch` rows (default: the
    workload's batch) on a noisy synthetic pyramid. `model`: reuse an already built network (built with
    the same memory format) instead of building one."""
    model = (model if model is not None else build_model(workload, options, device, seed)).eval()
    forward = torch.compile(model) if options.compile else model
    rows = batch or workload.batch
    inputs = synthetic_inputs(dataclasses.replace(workload, batch=rows), device, seed)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    pyramid = [with_memory_format(x, memory_format) for x in inputs["noise"]]
    bf16 = options.precision == "bf16"

    @torch.no_grad()
    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            forward(pyramid, inputs["t"], **inputs["conditioning"])

    return _first_call(Step(workload, options, model, run, device))


def step_flops(workload: Workload, train: bool = True, batch: int | None = None) -> int:
    """Model FLOPs of one training step (forward + backward) or one forward, counted on the meta device
    (shapes only: instant, whatever the model's size)."""
    rows = batch or workload.batch
    with torch.device("meta"):
        model = NestedUNet(workload.model)
        inputs = synthetic_inputs(dataclasses.replace(workload, batch=rows), torch.device("meta"))
    schedule = PyramidSchedule.from_config(workload.diffusion, workload.model.scales).to("meta")

    def once() -> None:
        if train:
            loss = diffusion_loss(
                model, inputs["images"], workload.model.scales, inputs["t"], inputs["noise"],
                inputs["conditioning"], schedule, workload.diffusion,
                time_scales=workload.model.time_scales if workload.model.num_frames else None,
            )
            loss.mean().backward()
        else:
            with torch.no_grad():
                model(inputs["noise"], inputs["t"], **inputs["conditioning"])

    return count_flops(once)


# --------------------------------------------------------------------------------------------------
# Timing
@dataclass
class Timing:
    seconds: list[float]  # per call, one entry per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> str:
        """min..max over the rounds, in % of the median."""
        lo, hi = min(self.seconds), max(self.seconds)
        return f"{100 * (lo / self.median - 1):+.0f}%..{100 * (hi / self.median - 1):+.0f}%"


def paired_speedup(reference: Timing, other: Timing) -> tuple[float, float, float]:
    """Speed of `other` over `reference`, round by round (the two ran back to back in each round, under
    about the same load): (median, min, max) of reference_time / other_time over the rounds."""
    ratios = [r / o for r, o in zip(reference.seconds, other.seconds, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt_speedup(reference: Timing, other: Timing) -> str:
    median, lo, hi = paired_speedup(reference, other)
    return f"{median:.2f}x ({lo:.2f}..{hi:.2f})"


def share_of_peak(flops: float, timing: Timing, peaks: list[tuple[int, Timing]]) -> float:
    """Median over rounds of (flops / time) over the fastest of the peak runs (FLOPs, timing) of the
    same round (see `peak_runs`)."""
    shares = []
    for index, seconds in enumerate(timing.seconds):
        peak = max(peak_flops / peak_timing.seconds[index] for peak_flops, peak_timing in peaks)
        shares.append(flops / seconds / peak)
    return statistics.median(shares)


def time_round_robin(
    runs: dict[str, Callable[[], None]], device: torch.device, rounds: int, calls: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Seconds per call of every run, measured in `rounds` interleaved rounds of `calls` calls each, so
    that a changing machine load affects every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
            if log is not None:
                log(f"  round {index + 1}/{rounds} {name}: {times[name][-1] * 1e3:.1f} ms/call")
    return {name: Timing(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------
# Runs in their own processes
def _serve(connection, threads: int, keep_memory: bool, builder: Callable[..., tuple[dict, dict]], args: tuple) -> None:
    """Worker process: build the runs, report their info, then time `calls` calls of a run on request."""
    torch.set_num_threads(threads)
    if keep_memory:
        from matryoshka.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    runs, info = builder(*args)
    connection.send(info)
    while True:
        request = connection.recv()
        if request is None:
            return
        name, calls, device = request
        synchronize(device)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(calls):
            runs[name]()
        synchronize(device)
        seconds = (time.perf_counter() - start) / calls
        connection.send((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls))


class IsolatedRuns:
    """Benchmark runs that each live in a process of their own and take turns.

    In one process, variants measured round-robin change each other's timings through what they leave
    behind: the allocator's free lists and the memory it returned to the system, caches, compiled-code
    state (on a 2-core VM the same eager fp32/bf16 pair read 1.29-1.66x depending on the harness). Here
    each group of runs is built by `builder(*args) -> (runs, info)` in a fresh process (spawned, so
    nothing is inherited), and only one process computes at a time; the others wait on a pipe.
    """

    def __init__(self, threads: int) -> None:
        import multiprocessing

        self._context = multiprocessing.get_context("spawn")
        self._threads = threads
        self._workers: dict[str, tuple[object, object]] = {}  # group -> (process, connection)
        self._names: dict[str, tuple[str, str]] = {}  # run name -> (group, name inside the group)
        self.info: dict[str, dict] = {}
        self.page_faults: dict[str, list[float]] = {}  # run name -> minor page faults per call, per round

    def add(self, group: str, builder: Callable[..., tuple[dict, dict]], *args, keep_memory: bool = False,
            names: dict[str, str] | None = None) -> dict:
        """Start a process that builds `builder(*args)`; `names`: public name -> the builder's run name
        (default: the group's name for its only run, "run"). Returns the builder's info."""
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(child, self._threads, keep_memory, builder, args), daemon=True
        )
        process.start()
        info = parent.recv()
        self._workers[group] = (process, parent)
        for public, inner in (names or {group: "run"}).items():
            self._names[public] = (group, inner)
        self.info[group] = info
        return info

    def time_round_robin(self, rounds: int, calls: int, device: torch.device,
                         log: Callable[[str], None] | None = None) -> dict[str, Timing]:
        """Like `time_round_robin`, each run timed inside its own process."""
        times: dict[str, list[float]] = {name: [] for name in self._names}
        for index in range(rounds):
            for name, (group, inner) in self._names.items():
                connection = self._workers[group][1]
                connection.send((inner, calls, device))
                seconds, faults = connection.recv()
                times[name].append(seconds)
                self.page_faults.setdefault(name, []).append(faults)
                if log is not None:
                    log(f"  round {index + 1}/{rounds} {name}: {times[name][-1] * 1e3:.1f} ms/call")
        return {name: Timing(values) for name, values in times.items()}

    def close(self) -> None:
        for process, connection in self._workers.values():
            connection.send(None)
            process.join(timeout=30)
        self._workers.clear()

    def __enter__(self) -> IsolatedRuns:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_step_runs(workload: Workload, options: Options, device_name: str = "cpu",
                    model: NestedUNet | None = None) -> tuple[dict, dict]:
    """IsolatedRuns builder: one training step (`run`; `model`: a built network, see build_train_step);
    info: its first call's seconds and, for compiled steps, the inductor cache's hits and misses during it
    ("cache")."""
    from torch._dynamo.utils import counters

    with quiet_compile_logs():
        step = build_train_step(workload, options, torch.device(device_name), model=model)
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    cache = f" ({hits} hit/{misses} miss)" if options.compile else ""
    return {"run": step.run}, {"first_call_s": step.first_call_s, "cache": cache}


def forward_runs(workload: Workload, options: Options, rows: int, device_name: str = "cpu",
                 model: NestedUNet | None = None) -> tuple[dict, dict]:
    """IsolatedRuns builder: one denoiser forward of `rows` rows (`run`; a guided sampling step of B
    samples is a forward of 2B rows, both branches in one batch); info: its first call's seconds. A
    low-precision forward keeps autocast's weight casts from call to call, as the pipeline's sampling
    loop does (pipeline._casts_kept_across_steps): this worker process enters one outer, disabled
    autocast context and never leaves it."""
    if options.precision != "fp32":
        torch.autocast(device_name, enabled=False).__enter__()
    with quiet_compile_logs():
        step = build_forward(workload, options, torch.device(device_name), batch=rows, model=model)
    return {"run": step.run}, {"first_call_s": step.first_call_s, "cache": ""}


def peak_step_runs(device_name: str = "cpu") -> tuple[dict, dict]:
    """IsolatedRuns builder: the peak runs of both precisions, named "<kind> <fp32|bf16>"; info maps
    each name to its FLOPs per run."""
    device = torch.device(device_name)
    runs, flops = {}, {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kind, (run, count) in peak_runs(device, dtype).items():
            runs[f"{kind} {precision}"] = run
            flops[f"{kind} {precision}"] = count
    return runs, flops


@contextlib.contextmanager
def quiet_compile_logs():
    """torch.compile can print warnings per graph break; keep the tables readable."""
    import logging

    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fmt_rate(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def fmt_flops(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "
