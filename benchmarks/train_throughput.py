"""Training throughput (images/s) of the tiny nested presets beside a single-resolution UNet.

Every stage of each preset (the 16 px core alone, then 32 over 16, ...) and a plain single-level
NestedUNet at 32 px of comparable parameter count are trained through the real trainer
(`matryoshka.training.train`: Fashion-MNIST batches, per-sample noise, the multi-resolution loss,
AdamW, EMA) for a few logging windows each; images/s comes from the trainer's own metrics, without the
first (warm-up) window. Configurations are measured round-robin, `--repeats` times, and the median is
reported, so that a shared machine's changing load hits all of them alike.

    python benchmarks/train_throughput.py                 # 15-30 minutes on 2 busy cores (all sections)
    python benchmarks/train_throughput.py --threads 2 --steps 60 --repeats 5

The "schedule" rows give the throughput of a preset's whole progressive schedule: its images divided
by the time its stages take at the measured rates (the cheap early stages raise it).

Further sections (all by default; pick with --sections):

- optim: the optimised paths of one training step (the trainer's step on synthetic inputs, see
  benchmarks/perf_common.py) of the tiny presets and the single-level UNet: eager fp32 with foreach
  AdamW (the trainer's step before this work; the 1.00x reference) against fused AdamW, channels_last,
  bf16 autocast and torch.compile, measured round-robin in one process. Compilation is timed apart
  from the steady state (first call, with the inductor cache's hits and misses). Model FLOPs per step
  (torch.utils.flop_counter) over the step time, as a share of the FLOP/s of the faster of a 2048^3
  matmul and a large 3x3 convolution timed in the same rounds (perf_common.peak_runs).
- trainer: the real trainer with the winning options (optim.precision, optim.compile, fused AdamW)
  against its eager fp32 foreach path, on fashion_tiny_32x16's nested stage (images/s from its logs).
- official: the official ml-mdm architectures with random weights (configs/t2i_256.yaml: the 64 px
  core and the 256-over-64 model) and a single-resolution 256 px UNet of the same widths, batch
  --official-batch (default 1): forward + backward only (no AdamW: its 3.7 GB of state for 461M
  parameters does not fit beside the other processes of a small shared machine), eager fp32 and bf16
  (compiling a 461M-parameter model takes too long on a small CPU; gpu_check.sh measures it on a GPU).

The last line is `speedup over eager fp32: X.XX`, the best optimised step of fashion_tiny_32x16 over
its eager fp32 step (optim section; the median over rounds of the two step times' ratio in each round),
or n/a without that section.

    python benchmarks/train_throughput.py --sections optim           # the speedup alone (2-5 min)
    python benchmarks/train_throughput.py --fresh-compile-cache      # compile times without cache hits
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

from perf_common import (  # noqa: E402
    IsolatedRuns,
    Options,
    Timing,
    build_train_step,
    fmt_flops,
    fmt_speedup,
    machine_line,
    matmul_flops_per_s,
    paired_speedup,
    peak_step_runs,
    quiet_compile_logs,
    share_of_peak,
    step_flops,
    time_round_robin,
    train_step_runs,
    workloads,
)

from matryoshka.models import NestedUNet  # noqa: E402
from matryoshka.training import apply_overrides, load_train_config, read_metrics, train  # noqa: E402
from matryoshka.training.config import TrainConfig  # noqa: E402
from matryoshka.typed_config import from_dict, to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("fashion_tiny_32x16", "fashion_tiny_3level")
SECTIONS = ("presets", "optim", "trainer", "official")

# Single-resolution baselines: one 32 px UNet band down to the same lowest resolution as the presets'
# cores, with attention and a mid block at the bottom like them.
BASELINES = {
    "fashion_tiny_32x16": {
        "channels": [16, 32, 72], "num_res_blocks": [1, 1, 1], "attention_layers": [0, 0, 1], "num_heads": 4,
        "mid_block": True, "norm_groups": 8, "temb_dim": 128,
    },
    "fashion_tiny_3level": {
        "channels": [8, 16, 40, 72], "num_res_blocks": [1, 1, 1, 1], "attention_layers": [0, 0, 0, 1],
        "num_heads": 4, "mid_block": True, "norm_groups": 8, "temb_dim": 128,
    },
}

# The optim section's variants of one training step. The first is the 1.00x reference: the trainer's
# step before the optimisations (eager, fp32, foreach AdamW, which was the CPU default).
# "kept memory": matryoshka.cpu_allocator.keep_freed_memory in the path's process (the trainer's default
# since; it was not before, so the reference has it off).
REFERENCE = Options(precision="fp32", optimizer="foreach")
EAGER_VARIANTS = (
    REFERENCE,
    Options(precision="fp32", optimizer="fused"),
    Options(precision="fp32", optimizer="fused", keep_freed_memory=True),
    Options(precision="fp32", optimizer="fused", channels_last=True, keep_freed_memory=True),
    Options(precision="bf16", optimizer="fused"),
    Options(precision="bf16", optimizer="fused", keep_freed_memory=True),
    Options(precision="bf16", optimizer="fused", channels_last=True, keep_freed_memory=True),
)
COMPILED_VARIANTS = (
    Options(precision="fp32", optimizer="fused", compile=True, keep_freed_memory=True),
    Options(precision="bf16", optimizer="fused", compile=True, keep_freed_memory=True),
    Options(precision="bf16", optimizer="fused", compile=True, channels_last=True, keep_freed_memory=True),
)
PEAK_NAMES = ("matmul fp32", "conv3x3 fp32", "matmul bf16", "conv3x3 bf16")


@dataclass
class Arm:
    name: str
    config: TrainConfig
    levels: list[int]
    parameters: int
    schedule_steps: int  # steps of this stage in the preset's schedule (0 for baselines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timing_config(config: TrainConfig, stage: dict, log_every: int, extra: list[str] | None = None) -> TrainConfig:
    raw = to_dict(config)
    raw["stages"] = [stage]
    raw = apply_overrides(
        raw,
        [f"logging.every={log_every}", "logging.sample_count=0", "logging.tensorboard=false",
         "logging.progress=false", "checkpoint.every=0", "device=cpu", *(extra or [])],
    )
    return from_dict(TrainConfig, raw)


def arms_for(preset: str, steps: int, log_every: int, batch_size: int | None) -> list[Arm]:
    overrides = [f"data.batch_size={batch_size}"] if batch_size else []
    config = load_train_config(ROOT / "configs" / f"{preset}.yaml", overrides)
    arms = []
    for index, stage in enumerate(config.stages):
        model_config = config.mdm.model.innermost(stage.levels)
        measured = timing_config(config, {"levels": stage.levels, "steps": steps}, log_every)
        count = sum(p.numel() for p in NestedUNet(model_config).parameters())
        arms.append(Arm(f"{preset} stage {index + 1}", measured, model_config.sizes, count, stage.steps))
    raw = to_dict(config)
    raw["mdm"]["model"]["levels"] = [BASELINES[preset]]
    raw["mdm"]["diffusion"]["level_weights"] = None
    raw["mdm"]["diffusion"]["mixed_ratio"] = None
    raw["stages"] = [{"levels": 1, "steps": steps}]
    baseline = timing_config(from_dict(TrainConfig, raw), {"levels": 1, "steps": steps}, log_every)
    count = sum(p.numel() for p in NestedUNet(baseline.mdm.model).parameters())
    arms.append(Arm(f"single-level UNet (for {preset})", baseline, baseline.mdm.model.sizes, count, 0))
    return arms


def measure(arm: Arm, steps: int, scratch: Path) -> float:
    out = scratch / f"{arm.name.replace(' ', '_').replace('(', '').replace(')', '')}-{len(list(scratch.iterdir()))}"
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's progress messages are not the table
        train(arm.config, out, max_steps=steps)
    windows = [r["images_per_s"] for r in read_metrics(out)][1:]  # the first window includes warm-up
    return statistics.median(windows)



def _measure_worker(arm: Arm, steps: int, scratch: Path, threads: int) -> float:
    torch.set_num_threads(threads)
    return measure(arm, steps, scratch)


def measure_in_process(arm: Arm, steps: int, scratch: Path, threads: int) -> float:
    """`measure` in a fresh (spawned) process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_worker, arm, steps, scratch, threads).result()


# --------------------------------------------------------------------------------------------------
# Section "presets": the nested presets' stages and a single-level UNet through the real trainer
def presets_section(args: argparse.Namespace) -> None:
    arms = [arm for preset in args.presets for arm in arms_for(preset, args.steps, args.log_every, args.batch_size)]
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        for repeat in range(args.repeats):
            for arm in arms:
                rates[arm.name].append(measure(arm, args.steps, Path(scratch)))
                log(f"  repeat {repeat + 1}/{args.repeats} {arm.name}: {rates[arm.name][-1]:.1f} images/s")
    median = {name: statistics.median(values) for name, values in rates.items()}

    print("\n## Nested presets vs a single-level UNet (the trainer, eager fp32)\n")
    print(f"batch {arms[0].config.data.batch_size}, {args.steps} steps per measurement, median of {args.repeats}\n")
    header = ("configuration", "levels (px)", "params", "images/s", "vs single-level")
    print(f"| {header[0]:<44} | {header[1]:<12} | {header[2]:>7} | {header[3]:>8} | {header[4]:>15} |")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 9}|{'-' * 10}|{'-' * 17}|")
    for preset in args.presets:
        group = [arm for arm in arms if preset in arm.name]
        baseline = median[group[-1].name]
        for arm in group:
            rate = median[arm.name]
            print(f"| {arm.name:<44} | {str(arm.levels):<12} | {arm.parameters / 1e6:6.2f}M | {rate:8.1f} | "
                  f"{rate / baseline:14.2f}x |")
        stages = [arm for arm in group if arm.schedule_steps]
        images = sum(arm.schedule_steps for arm in stages)  # x batch on both sides of the ratio
        seconds = sum(arm.schedule_steps / median[arm.name] for arm in stages)
        print(f"| {preset + ' whole schedule':<44} | {'':<12} | {'':>7} | {images / seconds:8.1f} | "
              f"{images / seconds / baseline:14.2f}x |", flush=True)


# --------------------------------------------------------------------------------------------------
# Section "optim": optimised paths of one training step
def optim_section(args: argparse.Namespace) -> float | None:
    """Prints the table; returns the best speedup over eager fp32 of fashion_tiny_32x16 (None if absent)."""
    device = torch.device("cpu")
    speedup = None
    print("\n## Optimised training steps (one step = loss, backward, AdamW; synthetic batch)\n")
    print(f"Every path in its own process (spawned; the processes take turns, one computing at a time), "
          f"{args.optim_rounds} interleaved rounds of {args.optim_calls} steps per path, median (spread "
          "min..max over rounds); 'vs eager fp32' is the median (min..max) over rounds of the reference's step "
          "time over the path's, both measured back to back in the round; 'first call' is the first step "
          "(for compiled paths: compilation, with the inductor cache's hits/misses); share of peak = model "
          "FLOPs / step time over the FLOP/s of the faster of a 2048^3 matmul and a large 3x3 convolution (fp32, or "
          "bf16 for bf16 paths) timed in the same round, median over rounds\n")
    print("| workload | path | images/s | spread | vs eager fp32 | first call (s) | GFLOP/step | achieved FLOP/s | "
          "share of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.optim_workloads:
        workload = workloads([name], batch=args.batch_size)[0]
        variants = list(EAGER_VARIANTS)
        if name in args.compile_on:
            variants += list(COMPILED_VARIANTS)
        with IsolatedRuns(args.threads) as isolated:
            for options in variants:
                log(f"  building {workload.name} / {options.label} ...")
                isolated.add(options.label, train_step_runs, workload, options, keep_memory=options.keep_freed_memory)
            peak_flops = isolated.add("peaks", peak_step_runs, names={k: k for k in PEAK_NAMES})
            single = None
            if name == "tiny":  # the single-level UNet's reference step in the same rounds, for a paired ratio
                single = workloads(["tiny_single"], batch=args.batch_size)[0]
                isolated.add("single-level", train_step_runs, single, REFERENCE)
            timings = isolated.time_round_robin(args.optim_rounds, args.optim_calls, device, log)
            info = dict(isolated.info)
        flops = step_flops(workload)
        reference = timings[REFERENCE.label]
        best = 1.0
        for options in variants:
            label = options.label
            timing: Timing = timings[label]
            rate = workload.batch / timing.median
            achieved = flops / timing.median
            precision = options.precision
            references = [(peak_flops[k], timings[k]) for k in PEAK_NAMES if k.endswith(precision)]
            share = share_of_peak(flops, timing, references)
            best = max(best, paired_speedup(reference, timing)[0])
            print(f"| {workload.name} | {label} | {rate:.1f} | {timing.spread} | {fmt_speedup(reference, timing)} | "
                  f"{info[label]['first_call_s']:.1f}{info[label]['cache']} | {flops / 1e9:.2f} | "
                  f"{fmt_flops(achieved)}FLOP/s | {100 * share:.0f}% of {precision} |", flush=True)
        if name == "tiny":
            speedup = best
        if single is not None:  # images/s over the single-level UNet's (same batch): its time over ours
            fastest = max((o.label for o in variants), key=lambda label: paired_speedup(reference, timings[label])[0])
            print(f"\n{workload.name} vs the single-level UNet's eager fp32 foreach step, in the same rounds: "
                  f"{fmt_speedup(timings['single-level'], reference)} images/s in eager fp32, "
                  f"{fmt_speedup(timings['single-level'], timings[fastest])} with {fastest}\n", flush=True)
    return speedup


# --------------------------------------------------------------------------------------------------
# Section "trainer": the real trainer with the winning options
TRAINER_ARMS = {
    "eager fp32, foreach AdamW (reference)": [
        "optim.precision=fp32", "optim.implementation=foreach", "optim.keep_freed_memory=false"
    ],
    "eager fp32, fused AdamW, kept memory (the defaults)": ["optim.precision=fp32", "optim.implementation=auto"],
    "eager bf16, fused AdamW, kept memory": ["optim.precision=bf16", "optim.implementation=auto"],
    "eager bf16 channels_last, fused AdamW, kept memory": [
        "optim.precision=bf16", "optim.implementation=auto", "optim.channels_last=true"
    ],
    "eager bf16 channels_last, fused AdamW, kept memory, 1 data worker": [
        "optim.precision=bf16", "optim.implementation=auto", "optim.channels_last=true", "data.num_workers=1"
    ],
    "compile bf16 channels_last, fused AdamW, kept memory": [
        "optim.precision=bf16", "optim.implementation=auto", "optim.compile=true", "optim.channels_last=true"
    ],
}


def trainer_section(args: argparse.Namespace) -> None:
    preset = "fashion_tiny_32x16"
    overrides = [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    config = load_train_config(ROOT / "configs" / f"{preset}.yaml", overrides)
    levels = config.mdm.model.num_levels
    arms = [
        Arm(name, timing_config(config, {"levels": levels, "steps": args.steps}, args.log_every, extra),
            config.mdm.model.sizes, 0, 0)
        for name, extra in TRAINER_ARMS.items()
    ]
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    # Each run in a fresh process: optim.keep_freed_memory changes malloc for the whole process.
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch, quiet_compile_logs():
        for repeat in range(args.repeats):
            for arm in arms:
                rates[arm.name].append(measure_in_process(arm, args.steps, Path(scratch), args.threads))
                log(f"  repeat {repeat + 1}/{args.repeats} trainer {arm.name}: {rates[arm.name][-1]:.1f} images/s")
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n## The trainer with the optimised options ({preset}, both levels, batch {config.data.batch_size})\n")
    print(f"`matryoshka.training.train`, {args.steps} steps per run (the first {args.log_every}-step window, with "
          f"warm-up and compilation, excluded), median of {args.repeats} interleaved runs\n")
    print("| trainer options | images/s | runs | vs reference (per repeat: median, min..max) |")
    print("|---|---|---|---|")
    for arm in arms:
        values = ", ".join(f"{v:.0f}" for v in rates[arm.name])
        options = " ".join(TRAINER_ARMS[arm.name])
        ratios = [v / r for v, r in zip(rates[arm.name], rates[arms[0].name], strict=True)]
        print(f"| {arm.name}: `{options}` | {median[arm.name]:.1f} | {values} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}..{max(ratios):.2f}) |", flush=True)


# --------------------------------------------------------------------------------------------------
# Section "official": the official architectures, forward + backward
def official_section(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    names = ["official64", "official256", "official256_single"]
    print(f"\n## Official architectures (random weights), batch {args.official_batch}, forward + backward\n")
    print(f"{args.official_rounds} interleaved rounds of 1 step per variant after one warm-up step, median (spread); "
          "no optimizer step (see the docstring); eager only; share of peak as in the optim section\n")
    print("| model | params | path | s/step | images/s | spread | vs eager fp32 | vs single-level | GFLOP/step | "
          "achieved FLOP/s | share of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []  # (workload, flops, label, options, timing)
    for name in names:
        workload = workloads([name], official_batch=args.official_batch)[0]
        flops = step_flops(workload)
        steps = {}
        model = None  # one network for both precisions (autocast is not a property of the weights)
        for precision in ("fp32", "bf16"):
            options = Options(precision=precision, optimizer=None)
            log(f"  building {workload.name} / {options.label} (first step) ...")
            steps[options.label] = build_train_step(workload, options, device, model=model)
            model = steps[options.label].model
        runs = {k: v.run for k, v in steps.items()}
        peaks, peak_flops = peak_step_runs()  # named as PEAK_NAMES
        runs.update(peaks)
        timings = time_round_robin(runs, device, args.official_rounds, 1, log)
        for label, step in steps.items():
            precision = step.options.precision
            references = [(peak_flops[k], timings[k]) for k in PEAK_NAMES if k.endswith(precision)]
            share = share_of_peak(flops, timings[label], references)
            rows.append((name, workload, flops, step.options, timings[label], share))
        del steps, model
    measured = {(name, options.precision): timing for name, _, _, options, timing, _ in rows}
    for name, workload, flops, options, timing, share in rows:
        reference = measured[(name, "fp32")]
        versus = ""
        if name == "official256":  # images/s over the single-level UNet's at the same precision
            versus = f"{measured[('official256_single', options.precision)].median / timing.median:.2f}x"
        achieved = flops / timing.median
        print(f"| {workload.name} | {workload.parameters / 1e6:.0f}M | {options.label} | {timing.median:.1f} | "
              f"{workload.batch / timing.median:.3f} | {timing.spread} | {fmt_speedup(reference, timing)} | "
              f"{versus} | {flops / 1e9:.0f} | {fmt_flops(achieved)}FLOP/s | "
              f"{100 * share:.0f}% of {options.precision} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=40, help="trainer steps per measurement (default 40)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timing window (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets' batch size")
    parser.add_argument("--optim-workloads", nargs="+", default=["tiny", "tiny_t2i", "tiny_single"],
                        choices=["tiny", "tiny_t2i", "tiny_single"])
    parser.add_argument("--compile-on", nargs="*", default=["tiny"], choices=["tiny", "tiny_t2i", "tiny_single"],
                        help="workloads whose compiled variants are measured (default: tiny; minutes each)")
    parser.add_argument("--optim-rounds", type=int, default=5)
    parser.add_argument("--optim-calls", type=int, default=3, help="steps per round and variant (default 3)")
    parser.add_argument("--official-batch", type=int, default=1)
    parser.add_argument("--official-rounds", type=int, default=2)
    parser.add_argument("--fresh-compile-cache", action="store_true",
                        help="compile into an empty inductor cache (honest cold compile times)")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first one is warm-up)")
    torch.set_num_threads(args.threads)
    scratch_cache = None
    if args.fresh_compile_cache:
        scratch_cache = tempfile.TemporaryDirectory(prefix="inductor-cache-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch_cache.name

    print(f"machine: {machine_line()}", flush=True)
    peaks = {"fp32": matmul_flops_per_s(torch.device("cpu")),
             "bf16": matmul_flops_per_s(torch.device("cpu"), torch.bfloat16)}
    print(f"2048^3 matmul at the start: {fmt_flops(peaks['fp32'])}FLOP/s fp32, {fmt_flops(peaks['bf16'])}FLOP/s bf16 "
          f"({args.threads} thread(s)); the shares of peak below use the faster of a matmul and a 3x3 convolution "
          "timed beside each step", flush=True)
    speedup = None
    if "presets" in args.sections:
        presets_section(args)
    if "optim" in args.sections:
        speedup = optim_section(args)
    if "trainer" in args.sections:
        trainer_section(args)
    if "official" in args.sections:
        official_section(args)
    print(f"\nload average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"speedup over eager fp32: {speedup:.2f}" if speedup is not None else "speedup over eager fp32: n/a")
    if scratch_cache is not None:
        scratch_cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
