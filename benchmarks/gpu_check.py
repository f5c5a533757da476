"""The GPU half of benchmarks/gpu_check.sh: one part per call, each printing a markdown section.

    python benchmarks/gpu_check.py env            # the card, torch/CUDA, optional modules
    python benchmarks/gpu_check.py train          # official 256 model: training-step throughput, MFU, memory
    python benchmarks/gpu_check.py sample         # official 256 model: sampling latency per step

train: the official 256-over-64 text-to-image architecture (configs/t2i_256.yaml, 477M parameters, random
weights) and a single-resolution 256 px UNet of the same widths, one training step = the trainer's
loss, backward and fused AdamW on a synthetic batch (--batch, default 16): eager fp32 (the reference),
eager bf16 autocast, eager bf16 channels_last, then torch.compile'd bf16 (compile time reported apart
from the steady state) while the --budget allows. Model FLOPs per step (torch.utils.flop_counter) over
the step time give the model FLOPs utilisation against the card's bf16 dense peak (H100 SXM / H200:
989 TFLOP/s) and against a measured 8192^3 bf16 matmul. Peak memory: torch.cuda.max_memory_allocated.
sample: benchmarks/sampling_latency.py on the GPU (batched guidance vs two forwards, fp32 vs bf16).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name.
BF16_PEAKS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
)
OPTIONAL = ("yaml", "safetensors", "numpy", "PIL", "tqdm", "pytest", "hypothesis", "transformers")


def card_peak(name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak
    return None


def env() -> int:
    print("## Environment\n")
    print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if not torch.cuda.is_available():
        print("- no CUDA device visible: the GPU parts are skipped")
        return 1
    name = torch.cuda.get_device_name(0)
    peak = card_peak(name)
    props = torch.cuda.get_device_properties(0)
    print(f"- card: {name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"bf16 dense peak used for MFU: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown card (MFU n/a)'}")
    for module in OPTIONAL:
        try:
            importlib.import_module(module)
            state = "present"
        except ImportError:
            state = "MISSING"
        print(f"- {module}: {state}")
    try:
        importlib.import_module("matryoshka.training")
        print("- matryoshka.training imports")
    except ImportError as err:
        print(f"- matryoshka.training does not import ({err}): train/sample parts will be skipped")
        return 1
    return 0


def measured_matmul(dtype: torch.dtype, device: torch.device) -> float:
    from perf_common import matmul_flops_per_s

    size = 8192 if device.type == "cuda" else 1024
    return matmul_flops_per_s(device, dtype, size=size, seconds=1.0)


def train_part(args: argparse.Namespace) -> int:
    from perf_common import Options, build_train_step, step_flops, synchronize, workloads

    deadline = time.perf_counter() + args.budget
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (a smoke run of this script)"
    peak = card_peak(name)
    matmul_bf16 = measured_matmul(torch.bfloat16, device)
    print(f"## Training step, official architectures ({name}, batch {args.batch})\n")
    print(f"measured 8192^3 bf16 matmul: {matmul_bf16 / 1e12:.0f} TFLOP/s; card bf16 dense peak: "
          f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}; fp32 is torch's default (cuDNN convolutions "
          f"in TF32: {torch.backends.cudnn.allow_tf32}, matmuls in TF32: {torch.backends.cuda.matmul.allow_tf32})\n")
    print("| model | path | s/step | images/s | vs eager fp32 | vs single-level | first call (s) | TFLOP/step | "
          "MFU (card peak) | vs measured matmul | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    nested, single_name = args.models
    plans = [
        (nested, Options(precision="fp32", optimizer="fused")),
        (single_name, Options(precision="bf16", optimizer="fused")),
        (nested, Options(precision="bf16", optimizer="fused")),
        (nested, Options(precision="bf16", optimizer="fused", channels_last=True)),
        (nested, Options(precision="bf16", optimizer="fused", compile=True)),
        (nested, Options(precision="bf16", optimizer="fused", compile=True, channels_last=True)),
    ]
    times: dict[tuple[str, str], float] = {}
    for model_name, options in plans:
        if options.compile and time.perf_counter() > deadline - args.compile_reserve:
            print(f"| {model_name} | {options.label} | skipped: less than {args.compile_reserve} s of the "
                  f"{args.budget} s budget left for compiling | | | | | | | | |", flush=True)
            continue
        workload = workloads([model_name], batch=args.batch, official_batch=args.batch)[0]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = build_train_step(workload, options, device)  # the first call: warm-up or compilation
        except torch.cuda.OutOfMemoryError:
            print(f"| {model_name} | {options.label} | out of memory at batch {args.batch} | | | | | | | | |")
            continue
        for _ in range(2):  # settle (cuDNN autotuning, allocator)
            step.run()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step.run()
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        flops = step_flops(workload)
        times[(model_name, options.label)] = seconds
        reference = times.get((nested, Options(precision="fp32", optimizer="fused").label))
        single = times.get((single_name, Options(precision="bf16", optimizer="fused").label))
        versus_single = ""
        if model_name == nested and single and options.precision == "bf16" and not options.compile:
            versus_single = f"{single / seconds:.2f}x"
        achieved = flops / seconds
        print(f"| {workload.name} | {options.label} | {seconds:.3f} | {workload.batch / seconds:.1f} | "
              f"{f'{reference / seconds:.2f}x' if reference and model_name == nested else ''} | "
              f"{versus_single} | {step.first_call_s:.1f} | {flops / 1e12:.2f} | "
              f"{f'{100 * achieved / peak:.0f}%' if peak else 'n/a'} | {100 * achieved / matmul_bf16:.0f}% | "
              f"{memory:.1f} |", flush=True)
        del step
    print("\n(vs single-level: the nested model's images/s over the single-level UNet's, both eager bf16)")
    return 0


def sample_part(args: argparse.Namespace) -> int:
    import sampling_latency

    models = ["official256", "tiny"] if args.device == "cuda" else ["tiny"]
    return sampling_latency.main([
        "--device", args.device, "--models", *models, "--official-batch", str(args.sample_batch),
        "--batch", "64", "--steps", "10", "--rounds", "3", "--compile-on", *args.sample_compile_on,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["env", "train", "sample"])
    parser.add_argument("--batch", type=int, default=16, help="training batch of the 256 px models (default 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default 5)")
    parser.add_argument("--budget", type=float, default=200, help="seconds for the train part (default 200)")
    parser.add_argument("--compile-reserve", type=float, default=90,
                        help="start a compiled variant only with this many seconds of the budget left")
    parser.add_argument("--models", nargs=2, default=["official256", "official256_single"],
                        metavar=("NESTED", "SINGLE"), help="train part: the nested model and its single-level peer")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script itself")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--sample-compile-on", nargs="*", default=[],
                        help="models whose compiled sampling paths are measured (default none: time)")
    args = parser.parse_args(argv)
    if args.part == "env":
        return env()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"## {args.part}\n\nskipped: no CUDA device")
        return 1
    return train_part(args) if args.part == "train" else sample_part(args)


if __name__ == "__main__":
    sys.exit(main())
