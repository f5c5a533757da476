"""Where a step's time goes, op by op: torch.profiler over the training (or guided sampling) step of one
architecture of benchmarks/architectures.py, in two precision paths side by side.

For each op (aten name) the table gives its self CPU time per step and calls per step in each path,
sorted by how much slower the second path spends in it; below it, the step's wall time against the sum
of the ops' self times (the rest is Python and dispatch overhead outside any op), the number of op
calls per step (each one a dispatch, and on a GPU a kernel launch), and what the step's casts
convert (weights or activations, told apart by shape).

    python benchmarks/profile_ops.py --arch tiny --kind train --paths fp32 bf16
    python benchmarks/profile_ops.py --arch three_level --kind sample --paths fp32 bf16+cl --top 25

Both paths run in this process, taking turns round by round, after warm-up; the profiler's own overhead
inflates every op alike, so read the ratios and the ranking, not the absolute times. Quiet machine only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from architectures import PATHS, architecture  # noqa: E402
from perf_common import build_forward, build_train_step, machine_line  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def op_profile(run, steps: int) -> tuple[dict[str, tuple[float, int]], float]:
    """{op name: (self CPU microseconds per step, calls per step)} and the wall time per step (s), over
    `steps` profiled calls of `run`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - start) / steps
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        totals[event.key][0] += event.self_cpu_time_total / steps
        totals[event.key][1] += event.count / steps
    return {name: (us, int(round(calls))) for name, (us, calls) in totals.items()}, wall


def cast_kinds(step) -> dict[str, int]:
    """The `aten::_to_copy` calls of one step, by what they convert: a tensor of a parameter's shape
    (the weights and, in backward, their gradients), an activation (rank >= 3) or anything else."""
    shapes = {tuple(p.shape) for p in step.model.parameters()}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step.run()
    kinds: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.name == "aten::_to_copy":
            shape = tuple(event.input_shapes[0]) if event.input_shapes else ()
            kinds["parameter-shaped" if shape in shapes else "activation" if len(shape) >= 3 else "other"] += 1
    return dict(kinds)


def _mean_profile(profiles: list[tuple[dict[str, tuple[float, int]], float]]) -> tuple[dict, float]:
    """The mean over rounds of op_profile's results."""
    names = {name for ops, _ in profiles for name in ops}
    ops = {name: (sum(p[0].get(name, (0.0, 0))[0] for p in profiles) / len(profiles),
                  max(p[0].get(name, (0.0, 0))[1] for p in profiles)) for name in names}
    return ops, sum(wall for _, wall in profiles) / len(profiles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="an architecture of benchmarks/architectures.py")
    parser.add_argument("--kind", choices=["train", "sample"], default="train")
    parser.add_argument("--paths", nargs=2, default=["fp32", "bf16"], choices=sorted(PATHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per path and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds: the paths take turns")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20, help="ops shown")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = architecture(args.arch, args.batch, 1)
    device = torch.device("cpu")
    steps = {}
    for path in args.paths:
        options = PATHS[path]
        if args.kind == "train":
            steps[path] = build_train_step(workload, options, device)
        else:
            steps[path] = build_forward(workload, options, device, batch=2 * workload.batch)
        for _ in range(args.warmup):
            steps[path].run()
    # The paths take turns, round by round, so a drift of the machine's speed hits both alike.
    rounds: dict[str, list] = {path: [] for path in args.paths}
    for _ in range(args.rounds):
        for path in args.paths:
            rounds[path].append(op_profile(steps[path].run, args.steps))
    results = {path: _mean_profile(profiles) for path, profiles in rounds.items()}

    first, second = args.paths
    ops_a, ops_b = results[first][0], results[second][0]
    names = set(ops_a) | set(ops_b)
    delta = {n: ops_b.get(n, (0.0, 0))[0] - ops_a.get(n, (0.0, 0))[0] for n in names}
    print(machine_line())
    print(f"{workload.name}, {args.kind} step, batch {workload.batch}, {args.threads} thread(s), "
          f"{args.rounds} rounds of {args.steps} profiled steps per path after {args.warmup} warm-up\n")
    print(f"| op | {first} ms/step | {second} ms/step | {second} - {first} | calls {first} | calls {second} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in sorted(names, key=lambda n: -abs(delta[n]))[: args.top]:
        us_a, calls_a = ops_a.get(name, (0.0, 0))
        us_b, calls_b = ops_b.get(name, (0.0, 0))
        print(f"| {name} | {us_a / 1e3:.2f} | {us_b / 1e3:.2f} | {delta[name] / 1e3:+.2f} | {calls_a} | {calls_b} |")
    print()
    for path in args.paths:
        print(f"{path}: casts (aten::_to_copy) per step by kind: {cast_kinds(steps[path])}")
    for path, (ops, wall) in results.items():
        in_ops = sum(us for us, _ in ops.values()) / 1e6
        calls = sum(c for _, c in ops.values())
        print(f"{path}: {wall * 1e3:.1f} ms/step under the profiler; ops' self time {in_ops * 1e3:.1f} ms "
              f"({in_ops / wall:.0%}); {calls} op calls per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
