"""What computing small matmuls in float32 under CPU bf16 autocast (layers.Linear) gains: the bf16 step
with the rule against the same step with every matmul in bf16, in one process, calls interleaved
(the rule is read at call time, so one model serves both), many rounds, paired ratios.

    python benchmarks/small_matmuls.py --archs tiny tiny_t2i three_level video_tiny --rounds 30
    python benchmarks/small_matmuls.py --linear      # where the threshold comes from: one Linear, both ways
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from architectures import PATHS, architecture  # noqa: E402
from perf_common import build_forward, build_train_step, machine_line  # noqa: E402

from matryoshka.models import layers  # noqa: E402


def paired(run, rounds: int, calls: int) -> tuple[float, float, float, float]:
    """(ms per call with the rule, then the speed-up of the rule: median, 10th and 90th percentile)."""
    rule = layers.SMALL_MATMUL_MACS
    ratios, times = [], []
    for _ in range(rounds):
        spent = {}
        for threshold in (rule, 0) if len(ratios) % 2 == 0 else (0, rule):  # alternate who goes first
            layers.SMALL_MATMUL_MACS = threshold
            start = time.perf_counter()
            for _ in range(calls):
                run()
            spent[threshold] = (time.perf_counter() - start) / calls
        ratios.append(spent[0] / spent[rule])
        times.append(spent[rule])
    layers.SMALL_MATMUL_MACS = rule
    deciles = statistics.quantiles(ratios, n=10)
    return 1e3 * statistics.median(times), statistics.median(ratios), deciles[0], deciles[-1]


LINEAR_SHAPES = [(8, 128, 512), (8, 512, 128), (8, 384, 128), (256, 64, 64), (128, 128, 256), (1024, 64, 64),
                 (64, 256, 512), (512, 128, 384), (2048, 64, 192), (616, 384, 128)]


def linear_table(rounds: int) -> None:
    """One Linear's forward + backward, float32 against bf16 autocast, at the layer sizes of small models."""
    print("| rows x in -> out | multiply-adds | fp32 | bf16 autocast | bf16 speed |")
    print("|---|---:|---:|---:|---:|")
    for rows, fan_in, fan_out in LINEAR_SHAPES:
        x = torch.randn(rows, fan_in, requires_grad=True)
        weight = torch.randn(fan_out, fan_in, requires_grad=True)
        bias = torch.randn(fan_out, requires_grad=True)

        def call(bf16: bool, x=x, weight=weight, bias=bias) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.linear(x, weight, bias)
            y.float().sum().backward()

        spent: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(10):
            call(False), call(True)
        for _ in range(rounds):
            for bf16 in (False, True):
                start = time.perf_counter()
                for _ in range(50):
                    call(bf16)
                spent[bf16].append((time.perf_counter() - start) / 50)
        fp32, low = statistics.median(spent[False]), statistics.median(spent[True])
        print(f"| {rows} x {fan_in} -> {fan_out} | {rows * fan_in * fan_out / 1e6:.1f}M | {fp32 * 1e6:.0f} us | "
              f"{low * 1e6:.0f} us | {fp32 / low:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "tiny_t2i", "three_level", "video_tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--linear", action="store_true", help="time single Linear layers instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.linear:
        print(f"machine: {machine_line()}; medians of {args.rounds} rounds of 50 calls\n")
        linear_table(args.rounds)
        return 0
    print(f"machine: {machine_line()}; {args.rounds} rounds of {args.calls} calls per side\n")
    print("| architecture | step | bf16 with the rule | rule's speed-up (median, 10th..90th pct) |")
    print("|---|---|---:|---:|")
    for name in args.archs:
        workload = architecture(name, args.batch, 1)
        for kind in ("train", "sample"):
            if kind == "train":
                step = build_train_step(workload, PATHS["bf16"], torch.device("cpu"))
            else:
                step = build_forward(workload, PATHS["bf16"], torch.device("cpu"), batch=2 * workload.batch)
            for _ in range(3):
                step.run()
            ms, median, low, high = paired(step.run, args.rounds, args.calls)
            print(f"| {workload.name} | {kind} (batch {workload.batch}) | {ms:.1f} ms | "
                  f"{median:.3f}x ({low:.3f}..{high:.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
