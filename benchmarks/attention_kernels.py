"""Why the attention layers look the way they do: SDPA forward + backward per head layout and dtype.

`Attention._heads` hands F.scaled_dot_product_attention heads whose channels are adjacent in memory
(stride 1), which lets torch pick its fused flash kernel; the heads of a channels-first activation
have them L apart, and torch silently falls back to the math kernel (explicit L x L scores). And on the
CPU the bf16 kernels are slower than the fp32 ones, so `models.layers.attention` computes attention in
float32 under CPU autocast. The official code's attention is the math kernel on contiguous heads
(explicit bmm); that layout is measured too. This measures these choices at the attention shapes of the tiny presets
and of the official 64 px core, round-robin, median of --rounds.

    python benchmarks/attention_kernels.py
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_common, beside this script

from perf_common import fmt_speedup, machine_line, time_round_robin  # noqa: E402

# (label, rows N, heads, tokens L, head size d): self-attention of the tiny core at 8 px (batch 32) and
# of the official core at 32 px and 16 px (batch 2).
SHAPES = (
    ("tiny core, 8x8 px, batch 32", 32, 4, 64, 16),
    ("nested_tiny fixture core, 8x8 px, batch 8", 8, 8, 64, 8),
    ("official core, 16x16 px, batch 2", 2, 8, 256, 96),
    ("official core, 32x32 px, batch 2", 2, 8, 1024, 64),
)


LAYOUTS = ("strided heads", "contiguous heads", "contiguous heads, math kernel")


def case(n: int, heads: int, length: int, d: int, layout: str, dtype: torch.dtype):
    """fwd + bwd of SDPA on heads cut from a channels-first (N, 3C, L) qkv activation."""
    qkv = torch.randn(n, 3 * heads * d, length, dtype=dtype, requires_grad=True)

    def run() -> None:
        q, k, v = qkv.chunk(3, dim=1)
        split = [t.reshape(n, heads, d, length).transpose(-1, -2) for t in (q, k, v)]
        if layout != "strided heads":
            split = [t.contiguous() for t in split]
        with sdpa_kernel(SDPBackend.MATH) if layout == "contiguous heads, math kernel" else nullcontext():
            F.scaled_dot_product_attention(*split).float().square().mean().backward()

    run()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"machine: {machine_line()}\n")
    print(f"SDPA forward + backward, median ms of {args.rounds} interleaved rounds; speed-ups per round "
          "(median, min..max) against the channels-first fp32 call\n")
    print("| shape | heads as | dtype | kernel | ms | vs strided fp32 |")
    print("|---|---|---|---|---|---|", flush=True)
    for label, n, heads, length, d in SHAPES:
        runs, kernels = {}, {}
        for layout in LAYOUTS:
            for dtype in (torch.float32, torch.bfloat16):
                key = f"{layout}, {str(dtype).removeprefix('torch.')}"
                runs[key] = case(n, heads, length, d, layout, dtype)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    runs[key]()
                names = {e.key for e in prof.key_averages()}
                kernels[key] = "flash" if "aten::_scaled_dot_product_flash_attention_for_cpu" in names else "math"
        timings = time_round_robin(runs, device, args.rounds, 1)
        reference = timings["strided heads, float32"]
        for key, timing in timings.items():
            layout, dtype = key.rsplit(", ", 1)
            print(f"| {label} | {layout} | {dtype} | {kernels[key]} | {timing.median * 1e3:.1f} | "
                  f"{fmt_speedup(reference, timing)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
