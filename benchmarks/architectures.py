"""Fast on every architecture a user brings: the training step and the guided sampling step of a set of
architectures, in every documented precision path, each path in its own process, ratios to fp32.

The set stands for what users bring, not only what we tuned:
- tiny, tiny_t2i: the Fashion-MNIST presets (32 over 16 px; class labels / MiniLM text);
- three_level: a model in the official layout at 32/16/8 px (masked cross-attention on 384-d text
  states, attention with FFN at both resolutions of the core, a mid block; 4.4M parameters);
- video_tiny: the text-to-video preset (8 frames, 32 over 16 px, temporal convolutions and attention);
- official64, official256: the released t2i_256 architectures (the 64 px core; 256 over 64), random
  weights, batch --official-batch, forward + backward without AdamW (its state does not fit beside the
  rest on a small machine).

Paths: eager fp32 (the reference), bf16 autocast, bf16 autocast + channels_last, torch.compile (fp32),
and what precision="auto" picks (matryoshka.precision, measured in this process).
A training step is the trainer's loss, backward and (fused, the trainer's default) AdamW step on
synthetic inputs; a guided sampling
step is one denoiser forward of 2 x batch rows (both guidance branches in one batch, as the pipeline
runs them). Every path of an architecture is built in its own spawned process (perf_common.IsolatedRuns)
and the processes take turns, round by round, so load changes hit every path alike; each ratio is the
median over rounds of fp32 time / path time in the same round, with its min..max.

    python benchmarks/architectures.py                                 # every architecture, 2 threads
    python benchmarks/architectures.py --archs tiny three_level --rounds 9 --threads 2
    python benchmarks/architectures.py --archs official64 --paths fp32 bf16 --rounds 3

Run it on a quiet machine: the ratios are robust to steady load, not to load that comes and goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_check import card_peak  # noqa: E402
from perf_common import (  # noqa: E402
    IsolatedRuns,
    Options,
    Workload,
    forward_runs,
    machine_line,
    paired_speedup,
    preset_workload,
    step_flops,
    train_step_runs,
    workloads,
)

from matryoshka.models import LevelConfig, ModelConfig, NestedUNet  # noqa: E402
from matryoshka.precision import MIN_SPEEDUP, bf16_speedup, resolve_precision  # noqa: E402

TRAINER_ADAMW = "auto"  # the trainer's default: the fused kernel on CPU and CUDA
PATHS = {
    "fp32": Options(optimizer=TRAINER_ADAMW),
    "bf16": Options(precision="bf16", optimizer=TRAINER_ADAMW),
    "bf16+cl": Options(precision="bf16", channels_last=True, optimizer=TRAINER_ADAMW),
    "compiled": Options(compile=True, optimizer=TRAINER_ADAMW),
    # bf16 as it was before small matmuls ran in float32 (layers.Linear): what that rule gains
    "bf16-mm": Options(precision="bf16", optimizer=TRAINER_ADAMW, bf16_small_matmuls=True),
}


def auto_choice(workload: Workload, kind: str, threads: int, device: str = "cpu") -> str:
    """What precision="auto" picks for this architecture here, and the bf16 speed-up it measured."""
    if device != "cpu":
        return f"{resolve_precision('auto', None, device, 0)} (rule)"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = NestedUNet(workload.model).train(kind == "train")
    rows = workload.batch if kind == "train" else 2 * workload.batch
    speedup = bf16_speedup(model, rows, train=kind == "train")
    return f"{'bf16' if speedup >= MIN_SPEEDUP else 'fp32'} ({speedup:.2f}x)"


def three_level(batch: int) -> Workload:
    """32/16/8 px in the official layout: the released models' options on a small model."""
    levels = [
        LevelConfig([32, 32], [1, 1], norm_groups=8, temb_dim=128),
        LevelConfig([32, 64], [1, 1], norm_groups=8, temb_dim=128),
        LevelConfig([48, 96], [2, 2], attention_layers=[1, 1], attention_ffn=True, num_heads=4, mid_block=True,
                    norm_groups=8, temb_dim=128),
    ]
    model = ModelConfig(levels=levels, image_size=32, in_channels=3, text_dim=384, masked_cross_attention=True)
    diffusion = preset_workload("fashion_t2i_32x16").diffusion
    return Workload("three-level official layout 32/16/8", model, dataclasses.replace(diffusion, level_weights=None),
                    batch)


def architecture(name: str, batch: int, official_batch: int) -> Workload:
    if name == "three_level":
        return three_level(batch)
    if name == "video_tiny":
        return preset_workload("video_tiny", batch=max(1, batch // 4))  # a batch of clips: 8 frames each
    return workloads([name], batch=batch, official_batch=official_batch)[0]


def measure(workload: Workload, paths: list[str], kind: str, rounds: int, calls: int, threads: int,
            official: bool, device: str = "cpu") -> dict[str, dict]:
    """Per path: median seconds per call, and its speed over fp32 (median, min, max over rounds)."""
    with IsolatedRuns(threads) as isolated:
        for path in paths:
            options = PATHS[path]
            if official:
                options = dataclasses.replace(options, optimizer=None)
            if kind == "train":
                isolated.add(path, train_step_runs, workload, options, device)
            else:
                isolated.add(path, forward_runs, workload, options, 2 * workload.batch, device)
        timings = isolated.time_round_robin(rounds, calls, torch.device(device))
        first = {path: isolated.info[path]["first_call_s"] for path in paths}
    reference = timings[paths[0]]
    return {path: {"ms": 1e3 * timings[path].median, "first_s": first[path],
                   "speed": paired_speedup(reference, timings[path])} for path in paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "tiny_t2i", "three_level", "video_tiny", "official64",
                                                       "official256"])
    parser.add_argument("--paths", nargs="+", default=["fp32", "bf16", "bf16+cl", "compiled"], choices=list(PATHS),
                        help="the first is the reference (default fp32)")
    parser.add_argument("--kinds", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    parser.add_argument("--batch", type=int, default=8, help="images per step (video: clips = batch / 4)")
    parser.add_argument("--official-batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3, help="calls per round (official models: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda: the MFU of the bf16 path too)")
    args = parser.parse_args(argv)
    peak = card_peak(torch.cuda.get_device_name()) if args.device.startswith("cuda") else None

    print(f"machine: {machine_line()}; {args.threads} thread(s) per process, {args.rounds} rounds\n")
    mfu = peak is not None and "bf16" in args.paths
    header = "| architecture | params | step | " + " | ".join(args.paths) + " | auto picks |"
    print(header + (" bf16 MFU |" if mfu else ""))
    print("|---|---:|---|" + "---:|" * len(args.paths) + "---|" + ("---:|" if mfu else ""))
    for name in args.archs:
        workload = architecture(name, args.batch, args.official_batch)
        official = name.startswith("official")
        for kind in args.kinds:
            results = measure(workload, args.paths, kind, args.rounds, 1 if official else args.calls, args.threads,
                              official, args.device)
            cells = []
            for path in args.paths:
                result = results[path]
                if path == args.paths[0]:
                    cells.append(f"{result['ms']:.1f} ms")
                else:
                    median, low, high = result["speed"]
                    cells.append(f"{median:.2f}x ({low:.2f}..{high:.2f})")
            step = f"{kind} (batch {workload.batch}{', no AdamW' if official and kind == 'train' else ''})"
            cells.append(auto_choice(workload, kind, args.threads, args.device))
            if mfu:
                flops = step_flops(workload, train=kind == "train",
                                   batch=workload.batch if kind == "train" else 2 * workload.batch)
                cells.append(f"{flops / (results['bf16']['ms'] / 1e3) / peak:.1%}")
            print(f"| {workload.name} | {workload.parameters / 1e6:.1f}M | {step} | " + " | ".join(cells) + " |",
                  flush=True)
    print(f"\ncells: the {args.paths[0]} step's median time, then each path's speed over it (median over rounds of "
          "the two times' ratio in the same round, min..max); > 1 = faster. auto picks: what precision=\"auto\" "
          f"chooses (bf16 when its own short measurement, shown, is at least {MIN_SPEEDUP}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
