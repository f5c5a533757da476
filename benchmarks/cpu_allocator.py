"""What glibc's malloc costs a CPU step, with and without `matryoshka.cpu_allocator.keep_freed_memory`.

Each path runs in a process of its own (malloc's settings are process-wide), the processes take turns
(perf_common.IsolatedRuns), and every ratio is the default allocator's time over the kept-memory one,
round by round. Paths: a training step of fashion_tiny_32x16 (loss, backward, fused AdamW; synthetic
batch of 32) in fp32 and in bf16 channels_last, and a `MatryoshkaPipeline` call on the embedded
fashion-t2i model (--images prompts, --steps DDIM steps, guidance 3; the text encoder included) in fp32
and bf16. Minor page faults per call are counted in each process (getrusage).

    python benchmarks/cpu_allocator.py                 # about 3 minutes on a 2-core VM
    python benchmarks/cpu_allocator.py --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

from perf_common import IsolatedRuns, Options, fmt_speedup, machine_line, train_step_runs, workloads  # noqa: E402

PROMPTS = ("a photo of a sneaker", "a photo of a dress", "a photo of a bag", "a photo of a coat")


def sampling_runs(precision: str, images: int, steps: int) -> tuple[dict, dict]:
    """IsolatedRuns builder: one pipeline call on the embedded model (`run`), after a warm-up call."""
    import matryoshka
    from matryoshka.pipeline import MatryoshkaPipeline

    pipeline = MatryoshkaPipeline.from_pretrained(Path(matryoshka.__file__).parent / "assets" / "fashion-t2i")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]

    def run() -> None:
        pipeline(prompts, num_inference_steps=steps, guidance_scale=3.0, precision=precision, generator=0,
                 progress=False)

    run()
    return {"run": run}, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=16, help="images per pipeline call (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per pipeline call (default 20)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    tiny = workloads(["tiny"])[0]
    paths = {  # name -> (builder, args, calls per round)
        "training step, fp32": (train_step_runs, (tiny, Options(precision="fp32", optimizer="fused")), 3),
        "training step, bf16 channels_last": (
            train_step_runs, (tiny, Options(precision="bf16", channels_last=True, optimizer="fused")), 3
        ),
        "sampling call, fp32": (sampling_runs, ("fp32", args.images, args.steps), 1),
        "sampling call, bf16": (sampling_runs, ("bf16", args.images, args.steps), 1),
    }
    print(machine_line(device))
    print(f"\n{args.rounds} rounds; each path and allocator setting in its own process, taking turns; "
          f"training: fashion_tiny_32x16, batch 32, 3 steps per round; sampling: embedded fashion-t2i, "
          f"{args.images} images x {args.steps} DDIM steps, guidance 3, one call per round\n")
    print("| path | default malloc (ms) | page faults per call | kept memory (ms) | page faults per call | speedup |")
    print("|---|---|---|---|---|---|")
    for name, (builder, builder_args, calls) in paths.items():
        with IsolatedRuns(args.threads) as isolated:
            isolated.add("default", builder, *builder_args)
            isolated.add("kept", builder, *builder_args, keep_memory=True)
            # Two rounds of each as warm-up (the heap reaches its steady size), then the measured rounds.
            isolated.time_round_robin(2, calls, device)
            isolated.page_faults.clear()
            timings = isolated.time_round_robin(args.rounds, calls, device, lambda m: print(m, file=sys.stderr))
            faults = {k: statistics.median(v) for k, v in isolated.page_faults.items()}
        default, kept = timings["default"], timings["kept"]
        print(f"| {name} | {default.median * 1e3:.1f} | {faults['default']:.0f} | {kept.median * 1e3:.1f} | "
              f"{faults['kept']:.0f} | {fmt_speedup(default, kept)} |", flush=True)


if __name__ == "__main__":
    main()
