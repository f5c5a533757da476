"""Training throughput (images/s) of the tiny nested presets beside a single-resolution UNet.

Every stage of each preset (the 16 px core alone, then 32 over 16, ...) and a plain single-level
NestedUNet at 32 px of comparable parameter count are trained through the real trainer
(`matryoshka.training.train`: Fashion-MNIST batches, per-sample noise, the multi-resolution loss,
AdamW, EMA) for a few logging windows each; images/s comes from the trainer's own metrics, without the
first (warm-up) window. Configurations are measured round-robin, `--repeats` times, and the median is
reported, so that a shared machine's changing load hits all of them alike.

    python benchmarks/train_throughput.py                 # ~3 minutes on 2 cores
    python benchmarks/train_throughput.py --threads 2 --steps 60 --repeats 5

The "schedule" rows give the throughput of a preset's whole progressive schedule: its images divided
by the time its stages take at the measured rates (the cheap early stages raise it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from matryoshka.models import NestedUNet
from matryoshka.training import apply_overrides, load_train_config, read_metrics, train
from matryoshka.training.config import TrainConfig
from matryoshka.typed_config import from_dict, to_dict

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("fashion_tiny_32x16", "fashion_tiny_3level")

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


@dataclass
class Arm:
    name: str
    config: TrainConfig
    levels: list[int]
    parameters: int
    schedule_steps: int  # steps of this stage in the preset's schedule (0 for baselines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{platform.platform()}, {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} thread(s)), load average {load}"
    )


def timing_config(config: TrainConfig, stage: dict, log_every: int) -> TrainConfig:
    raw = to_dict(config)
    raw["stages"] = [stage]
    raw = apply_overrides(
        raw,
        [f"logging.every={log_every}", "logging.sample_count=0", "logging.tensorboard=false",
         "logging.progress=false", "checkpoint.every=0", "device=cpu"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=40, help="steps per measurement (default 40)")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timing window (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="round-robin repeats, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets' batch size")
    args = parser.parse_args(argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first one is warm-up)")
    torch.set_num_threads(args.threads)

    arms = [arm for preset in args.presets for arm in arms_for(preset, args.steps, args.log_every, args.batch_size)]
    rates: dict[str, list[float]] = {arm.name: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as scratch:
        for repeat in range(args.repeats):
            for arm in arms:
                rates[arm.name].append(measure(arm, args.steps, Path(scratch)))
                print(f"  repeat {repeat + 1}/{args.repeats} {arm.name}: {rates[arm.name][-1]:.1f} images/s",
                      file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(f"machine: {machine()}")
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
              f"{images / seconds / baseline:14.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
