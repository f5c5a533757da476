"""Sampling latency per step: the DDIM loop with classifier-free guidance, per model and code path.

For each model (the tiny Fashion-MNIST presets, the official ml-mdm 64 px core and 256-over-64 model
with random weights) `matryoshka.sampling.sample` runs --steps DDIM steps of the official spacing
with guidance scale 7.5, and the time per step is reported for these paths:

- batched guidance: both branches in one forward of 2B rows (what `classifier_free_guidance` and the
  pipeline do; the 1.00x reference, in eager fp32)
- two forwards: the conditional and the unconditional branch as two forwards of B rows each
- no guidance: scale 1, one forward of B rows (the floor)
- bf16 autocast, channels_last, and torch.compile (forward only; the first call, i.e. compilation, is
  reported apart) of the batched path

Variants are measured round-robin (--rounds rounds), the median and its spread over rounds reported;
FLOPs per step are counted with torch.utils.flop_counter and set against this run's measured matmul
FLOP/s. Only the network's forward and the sampler's arithmetic are timed (no text encoder, no image
encoding), with random conditioning of the model's shapes.

    python benchmarks/sampling_latency.py                                   # tiny presets (~3 min)
    python benchmarks/sampling_latency.py --models official64 official256 --steps 1 --rounds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

from perf_common import (  # noqa: E402
    TEXT_TOKENS,
    Options,
    Workload,
    build_model,
    count_flops,
    fmt_flops,
    fmt_speedup,
    machine_line,
    matmul_flops_per_s,
    peak_runs,
    quiet_compile_logs,
    share_of_peak,
    synchronize,
    time_round_robin,
    workloads,
)

from matryoshka import sampling  # noqa: E402
from matryoshka.diffusion import PyramidSchedule  # noqa: E402
from matryoshka.guidance import classifier_free_guidance  # noqa: E402
from matryoshka.schedule import spaced_timesteps  # noqa: E402
from matryoshka.schedulers import DDIMScheduler  # noqa: E402

MODELS = ("tiny", "tiny_t2i", "official64", "official256")
GUIDANCE = 7.5


def branches(workload: Workload, rows: int, device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """(conditional, unconditional) model kwargs for `rows` samples: labels vs the null label, or two
    sets of random text states."""
    model = workload.model
    generator = torch.Generator().manual_seed(seed)
    cond: dict[str, torch.Tensor] = {}
    uncond: dict[str, torch.Tensor] = {}
    if model.num_classes > 0:
        cond["labels"] = torch.randint(0, model.num_classes, (rows,), generator=generator).to(device)
        uncond["labels"] = torch.full((rows,), model.num_classes, device=device)
    if model.text_dim > 0:
        for kwargs in (cond, uncond):
            kwargs["text_states"] = torch.randn(rows, TEXT_TOKENS, model.text_dim, generator=generator).to(device)
            kwargs["text_mask"] = torch.ones(rows, TEXT_TOKENS, dtype=torch.long, device=device)
    return cond, uncond


def make_denoiser(forward: Callable, cond: dict, uncond: dict, mode: str, bf16: bool, device: torch.device):
    """The denoiser of one path: mode "batched", "two" (two forwards) or "none" (no guidance)."""
    if mode == "batched":
        guided = classifier_free_guidance(forward, cond, uncond, GUIDANCE)
    elif mode == "none":
        guided = classifier_free_guidance(forward, cond, uncond, 1.0)
    else:

        def guided(pyramid, t):
            c = forward(pyramid, t, **cond)
            u = forward(pyramid, t, **uncond)
            return [ui + GUIDANCE * (ci - ui) for ci, ui in zip(c, u, strict=True)]

    def denoise(pyramid, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = guided(pyramid, t)
        return [o.float() for o in out]  # the sampler's arithmetic stays in float32

    return denoise


@dataclasses.dataclass
class Path_:
    label: str
    mode: str
    options: Options


PATHS = (
    Path_("batched guidance, eager fp32 (reference)", "batched", Options()),
    Path_("two forwards, eager fp32", "two", Options()),
    Path_("no guidance, eager fp32", "none", Options()),
    Path_("batched guidance, eager bf16", "batched", Options(precision="bf16")),
    Path_("batched guidance, eager fp32 channels_last", "batched", Options(channels_last=True)),
    Path_("batched guidance, eager bf16 channels_last", "batched", Options(precision="bf16", channels_last=True)),
    Path_("batched guidance, compile fp32", "batched", Options(compile=True)),
    Path_("batched guidance, compile bf16", "batched", Options(precision="bf16", compile=True)),
)


def measure_model(name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    batch = args.batch if not name.startswith("official") else args.official_batch
    workload = workloads([name], batch=batch, official_batch=batch)[0]
    schedule = PyramidSchedule.from_config(workload.diffusion, workload.model.scales).to(device)
    timesteps = spaced_timesteps(schedule.num_train_steps, args.num_inference_steps)[: args.steps + 1]
    cond, uncond = branches(workload, batch, device)
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(batch, workload.model.in_channels, s, s, generator=generator).to(device)
             for s in workload.model.sizes]
    noise_cl = [x.contiguous(memory_format=torch.channels_last) for x in noise]
    compile_here = name in args.compile_on
    paths = [p for p in PATHS if compile_here or not p.options.compile]
    if name.startswith("official"):  # one channels-last copy of the 461M network, for bf16 only
        paths = [p for p in paths if not p.options.channels_last or p.options.precision == "bf16"]
    models: dict[bool, torch.nn.Module] = {}  # one network per memory format, shared by the paths
    runs, first_call = {}, {}
    for path in paths:
        key = path.options.channels_last
        if key not in models:
            models[key] = build_model(workload, path.options, device).eval()
        forward = models[key]
        if path.options.compile:
            forward = torch.compile(forward)
        denoise = make_denoiser(forward, cond, uncond, path.mode, path.options.precision == "bf16", device)
        start_noise = noise_cl if key else noise

        def run(denoise=denoise, start_noise=start_noise) -> None:
            scheduler = DDIMScheduler()
            scheduler.set_timesteps(None, schedule, timesteps=timesteps, prediction=workload.diffusion.prediction)
            sampling.sample(denoise, start_noise, scheduler)

        print(f"  {workload.name}: first call of {path.label} ...", file=sys.stderr, flush=True)
        with quiet_compile_logs():
            synchronize(device)
            start = os.times().elapsed
            run()
            synchronize(device)
        first_call[path.label] = os.times().elapsed - start
        runs[path.label] = run
    peaks = {"fp32": peak_runs(device, torch.float32), "bf16": peak_runs(device, torch.bfloat16)}
    runs.update({f"{kind} {p}": run for p, pair in peaks.items() for kind, (run, _) in pair.items()})
    log = (lambda m: print(m, file=sys.stderr, flush=True))  # noqa: E731
    timings = time_round_robin(runs, device, args.rounds, 1, log)

    # FLOPs of one step's forward(s): 2B rows for batched guidance and for two forwards, B without guidance.
    model = models[False]
    pyramid = [x[:1].expand(2 * batch, *x.shape[1:]).contiguous() for x in noise]
    t = torch.full((2 * batch,), 500, device=device)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    with torch.no_grad():
        guided_flops = count_flops(lambda: model(pyramid, t, **both))
    reference = timings[PATHS[0].label]
    rows = []
    for path in paths:
        timing = timings[path.label]
        per_step = timing.median / args.steps
        flops = guided_flops / 2 if path.mode == "none" else guided_flops
        achieved = flops / per_step
        precision = path.options.precision
        share = share_of_peak(
            flops * args.steps, timing, [(f, timings[f"{k} {precision}"]) for k, (_, f) in peaks[precision].items()]
        )
        compile_note = f"{first_call[path.label]:.1f}" if path.options.compile else f"({first_call[path.label]:.1f})"
        rows.append(
            f"| {workload.name} | {batch} | {path.label} | {per_step * 1e3:.1f} | {timing.spread} | "
            f"{fmt_speedup(reference, timing)} | {compile_note} | {flops / 1e9:.1f} | {fmt_flops(achieved)}FLOP/s | "
            f"{100 * share:.0f}% of {precision} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny_t2i"], choices=MODELS)
    parser.add_argument("--batch", type=int, default=8, help="samples per call for the tiny presets (default 8)")
    parser.add_argument("--official-batch", type=int, default=1, help="samples per call, official models")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps timed per round (default 5)")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="the spacing's K (default 50)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, median reported (default 5)")
    parser.add_argument("--compile-on", nargs="*", default=["tiny"], choices=MODELS,
                        help="models whose compiled paths are measured (default: tiny)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fresh-compile-cache", action="store_true",
                        help="compile into an empty inductor cache (honest cold compile times)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="matryoshka.cpu_allocator.keep_freed_memory() first (what the commands do); all paths")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.steps > args.num_inference_steps:
        parser.error("--steps must be in [1, --num-inference-steps]")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.fresh_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")
    if args.keep_freed_memory:
        from matryoshka.cpu_allocator import keep_freed_memory

        keep_freed_memory()

    print(f"machine: {machine_line(device)}", flush=True)
    if args.keep_freed_memory:
        print("freed memory kept (matryoshka.cpu_allocator.keep_freed_memory) for every path", flush=True)
    peaks = {"fp32": matmul_flops_per_s(device), "bf16": matmul_flops_per_s(device, torch.bfloat16)}
    print(f"2048^3 matmul at the start: {fmt_flops(peaks['fp32'])}FLOP/s fp32, {fmt_flops(peaks['bf16'])}FLOP/s bf16 "
          "(the shares of peak below use the faster of a matmul and a 3x3 convolution timed beside each path, in "
          "the same rounds)\n")
    print(f"DDIM, guidance {GUIDANCE}, {args.steps} steps of the {args.num_inference_steps}-step spacing per round, "
          f"median of {args.rounds} interleaved rounds (spread min..max); 'vs reference': median (min..max) over "
          "rounds of the reference's time over the path's, both measured back to back; first call in s "
          "(compilation for compiled paths; in parentheses: warm-up only)\n")
    print("| model | batch | path | ms/step | spread | vs reference | first call (s) | GFLOP/step | achieved FLOP/s | "
          "share of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        for row in measure_model(name, args, device):
            print(row, flush=True)
    print(f"\nload average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
