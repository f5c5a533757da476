"""Peak memory of a training step (and of a guided sampling forward) per model and code path.

CPU: every configuration runs in its own subprocess, which reports resource.getrusage's ru_maxrss
(the process's peak resident memory) before its first step (network, inputs) and after its steps;
the difference is what the step needs on top of the weights: gradients, AdamW state (when the step
has an optimizer), activations kept for the backward pass and temporaries. tracemalloc cannot see
torch's allocations, and the peak of a process is only comparable in a fresh process. CUDA
(--device cuda): torch.cuda.max_memory_allocated around the steps, in one process.

Paths: eager fp32, bf16 autocast, and gradient checkpointing of the outer bands
(`NestedUNet.set_gradient_checkpointing`, optim.gradient_checkpointing in the trainer), whose memory
saving is set against its time cost: the step times of the plain and the checkpointed step are
measured round-robin in this process (--rounds), so that the machine's load hits both alike.

    python benchmarks/memory.py                                  # tiny presets and official models (~15 min)
    python benchmarks/memory.py --models tiny --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

from perf_common import (  # noqa: E402
    Options,
    build_forward,
    build_model,
    build_train_step,
    machine_line,
    synchronize,
    synthetic_inputs,
    time_round_robin,
    workloads,
)

MODELS = ("tiny", "tiny_single", "official64", "official256", "official256_single")
PATHS = {
    "eager fp32": Options(),
    "eager bf16": Options(precision="bf16"),
    "eager fp32, checkpointing": Options(gradient_checkpointing=True),
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(spec: dict) -> dict:
    """Runs in the subprocess: build one configuration, run its steps, report memory and time."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    official = spec["model"].startswith("official")
    workload = workloads([spec["model"]], batch=spec["batch"], official_batch=spec["batch"])[0]
    options = Options(**spec["options"])
    if official:
        options = Options(**{**spec["options"], "optimizer": None})  # see the table's note
    weights_mb = workload.parameters * 4 / 2**20
    if spec["kind"] == "build":  # the reference process: network and inputs, no step
        model = build_model(workload, options, device)
        inputs = synthetic_inputs(workload, device)
        return {"peak_rss_mb": maxrss_mb(), "held": [model is not None, len(inputs)]}
    if spec["kind"] == "train":  # building runs (and times) the first step
        step = build_train_step(workload, options, device)
    else:
        step = build_forward(workload, options, device, batch=2 * workload.batch)  # both guidance branches
    if device.type == "cuda":  # the steps' peak above the weights and buffers (what a fresh process holds)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = sum(t.numel() * t.element_size() for t in [*step.model.parameters(), *step.model.buffers()])
    times = []
    for _ in range(spec["steps"]):
        synchronize(device)
        start = time.perf_counter()
        step.run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    result = {"peak_rss_mb": maxrss_mb(), "weights_mb": weights_mb, "step_s": min(times, default=step.first_call_s)}
    if device.type == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
    return result


def run_child(spec: dict) -> dict:
    """A fresh interpreter per configuration: ru_maxrss is a high-water mark of the whole process."""
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_rss(spec: dict) -> float:
    """Peak RSS of a process that builds the same network and inputs but takes no step."""
    result = run_child({**spec, "kind": "build"})
    return result.get("peak_rss_mb", float("nan"))


def checkpointing_cost(name: str, batch: int, rounds: int, device: torch.device) -> tuple[float, float]:
    """Median step times (plain, checkpointed) measured round-robin in this process."""
    workload = workloads([name], batch=batch, official_batch=batch)[0]
    optimizer = None if name.startswith("official") else "foreach"
    plain = build_train_step(workload, Options(optimizer=optimizer), device)
    checkpointed = build_train_step(workload, Options(optimizer=optimizer, gradient_checkpointing=True), device)
    log = (lambda m: print(m, file=sys.stderr, flush=True))  # noqa: E731
    timings = time_round_robin({"plain": plain.run, "checkpointed": checkpointed.run}, device, rounds, 1, log)
    return timings["plain"].median, timings["checkpointed"].median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=32, help="tiny models' batch (default 32, the presets')")
    parser.add_argument("--official-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration after the first (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds for the checkpointing time cost")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine_line(device)}", flush=True)
    print(
        "\nPeak memory per configuration, each in a fresh process (CPU: ru_maxrss; CUDA: max_memory_allocated). "
        "'step needs' = peak during the steps minus the peak of a process that built the same network and "
        "inputs without stepping; 'beyond the gradients' = that minus the fp32 gradients (the size of the "
        "weights): activations kept for the backward, temporaries, bf16 weight copies, AdamW state. "
        "Tiny presets: loss, backward, AdamW (foreach), batch "
        f"{args.batch}; official models: forward + backward without an optimizer (AdamW would add 2x the "
        f"weights), batch {args.official_batch}; 'sampling' rows: one guided forward of 2 x batch rows, no "
        "gradients.\n"
    )
    print("| model | path | weights (MB) | process peak (MB) | step needs (MB) | beyond the gradients (MB) | "
          "vs eager fp32 | step (s) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        official = name.startswith("official")
        batch = args.official_batch if official else args.batch
        plain_need = None
        configs = [("train", label, options) for label, options in PATHS.items()]
        if name in ("tiny", "official256"):
            configs += [("sample", "sampling, eager fp32", Options()), ("sample", "sampling, eager bf16",
                                                                         Options(precision="bf16"))]
        if name.endswith("_single"):
            configs = configs[:1]
        elif workloads([name])[0].model.num_levels == 1:  # no outer band to checkpoint
            configs = [c for c in configs if not c[2].gradient_checkpointing]
        for kind, label, options in configs:
            spec = {
                "model": name, "batch": batch, "kind": kind, "steps": args.steps, "threads": args.threads,
                "device": args.device, "options": {k: getattr(options, k) for k in
                                                   ("precision", "channels_last", "compile", "gradient_checkpointing",
                                                    "optimizer")},
            }
            print(f"  {name} / {label} ...", file=sys.stderr, flush=True)
            result = run_child(spec)
            if "error" in result:
                print(f"| {name} | {label} | | failed: {result['error']} | | | | |", flush=True)
                continue
            if device.type == "cuda":
                need = result["cuda_peak_mb"]
                peak = need
            else:
                peak = result["peak_rss_mb"]
                need = peak - baseline_rss(spec)
            if kind == "train" and options == Options():
                plain_need = need
            versus = f"{need / plain_need:.2f}x" if plain_need and kind == "train" else ""
            beyond = f"{need - result['weights_mb']:.0f}" if kind == "train" else ""  # fp32 gradients: one per weight
            print(f"| {name} | {label} | {result['weights_mb']:.0f} | {peak:.0f} | {need:.0f} | {beyond} | {versus} | "
                  f"{result['step_s']:.2f} |", flush=True)
    print("\nGradient checkpointing of the outer bands: time cost, measured round-robin in one process "
          f"({args.rounds} rounds)\n")
    print("| model | plain step (s) | checkpointed step (s) | time cost |")
    print("|---|---|---|---|", flush=True)
    for name in [n for n in args.models if n in ("tiny", "official256")]:
        batch = args.official_batch if name.startswith("official") else args.batch
        plain, checkpointed = checkpointing_cost(name, batch, args.rounds, device)
        print(f"| {name} | {plain:.2f} | {checkpointed:.2f} | {100 * (checkpointed / plain - 1):+.0f}% |", flush=True)
    print(f"\nload average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
