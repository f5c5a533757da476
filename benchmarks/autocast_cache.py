"""What keeping autocast's weight casts across sampling steps saves (pipeline._casts_kept_across_steps):
`steps` bf16 denoiser calls as the pipeline makes them, inside one outer autocast context (every weight
cast once) against without it (every weight cast at every step), paired round by round in one process.

    python benchmarks/autocast_cache.py --archs tiny tiny_t2i three_level official64 --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from architectures import architecture  # noqa: E402
from perf_common import machine_line, synthetic_inputs  # noqa: E402

from matryoshka import pipeline  # noqa: E402
from matryoshka.models import NestedUNet  # noqa: E402


def measure(workload, device: torch.device, steps: int, rounds: int) -> tuple[float, tuple[float, float, float]]:
    """(ms per call with the casts kept, (median, min, max) of the paired speed-up of keeping them)."""
    torch.manual_seed(0)
    model = NestedUNet(workload.model).eval()
    inputs = synthetic_inputs(workload, device)
    network = pipeline._in_autocast(lambda x, t: model(x, t, **inputs["conditioning"]), device, torch.bfloat16)

    def sample(keep: bool) -> float:
        outer = pipeline._casts_kept_across_steps(device, "bf16") if keep else contextlib.nullcontext()
        start = time.perf_counter()
        with torch.no_grad(), outer:
            for _ in range(steps):
                network(inputs["noise"], inputs["t"])
        return (time.perf_counter() - start) / steps

    sample(True), sample(False)  # warm-up
    ratios, kept = [], []
    for index in range(rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        spent = {keep: sample(keep) for keep in order}
        ratios.append(spent[False] / spent[True])
        kept.append(spent[True])
    return 1e3 * statistics.median(kept), (statistics.median(ratios), min(ratios), max(ratios))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "tiny_t2i", "three_level", "official64"])
    parser.add_argument("--batch", type=int, default=8, help="images (official models: 1); rows = 2 x images")
    parser.add_argument("--steps", type=int, default=4, help="denoiser calls per measurement")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"machine: {machine_line()}; {args.rounds} rounds of {args.steps} guided bf16 denoiser calls per side\n")
    print("| architecture | rows | per call, casts kept | speed-up of keeping them (median, min..max) |")
    print("|---|---:|---:|---:|")
    for name in args.archs:
        workload = architecture(name, 2 * (1 if name.startswith("official") else args.batch), 1)
        ms, (median, low, high) = measure(workload, device, args.steps, args.rounds)
        print(f"| {workload.name} | {workload.batch} | {ms:.1f} ms | {median:.3f}x ({low:.3f}..{high:.3f}) |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
