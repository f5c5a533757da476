"""Are there vertical streaks in a model's samples? Column-wise against row-wise high-frequency energy.

Vertical streaks are intensity changes from column to column that rows do not have. For every image the
script takes the power spectrum of the garment (the 32 px canvas, background included) and compares the
energy at high horizontal frequencies (|f_x| >= 1/4 cycle per pixel, any f_y) with the energy at high
vertical frequencies; the ratio (horizontal / vertical) is 1 for isotropic texture. Real Fashion-MNIST
images give the reference ratio (garments are taller than wide and have seams, so it is not 1); a model
with streak artifacts gives a clearly larger one. Also: the mean absolute difference between neighbouring
columns and between neighbouring rows, and how much of each image's energy (mean removed) lies in radial
frequency bands (cycles per pixel): a model that draws too little texture has less than the real images
in the upper bands. --levels: the same for every level of a nested model's samples and for its output
pooled to each of the given sizes (real images pooled as the training pyramid pools them), to see at
which level texture goes missing.

    python benchmarks/stripes.py --models runs/study/diagnose32/a/seed0/model runs/study/diagnose32/c/seed0/model
    python benchmarks/stripes.py --size 64 --fit resize --levels 32 16 --models runs/study/study64/c/seed1/model \
        --timesteps 953,906,858,810,763,715,667,620,572,524,477,429,381,334,286,238,191,143,95,48,21,0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from matryoshka.data import FashionMNIST, caption_for_label
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.pyramid import downsample

BANDS = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.71))  # radial frequency, cycles per pixel (0.71: the corner)


def anisotropy(images: torch.Tensor) -> dict[str, float]:
    """images (N, 1, H, W) in [-1, 1] -> high-frequency energy ratios and neighbour differences."""
    x = images[:, 0].double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2  # (N, H, W): [.., f_y, f_x]
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs()[:, None].expand(h, w)
    fx = torch.fft.fftfreq(w).abs()[None, :].expand(h, w)
    horizontal = power[:, fx >= 0.25].sum(-1)  # changes along a row: column-to-column (vertical stripes)
    vertical = power[:, fy >= 0.25].sum(-1)
    ratio = (horizontal / vertical.clamp(min=1e-12)).median()
    column_diff = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    row_diff = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    radius = (fx**2 + fy**2).sqrt()
    total = power.sum(dim=(-2, -1)).clamp(min=1e-12)
    bands = {f"band_{lo:g}_{hi:g}": float((power[:, (radius >= lo) & (radius < hi)].sum(-1) / total).mean())
             for lo, hi in BANDS}
    return {"hf_ratio_median": float(ratio), "column_step": float(column_diff), "row_step": float(row_diff),
            "column_over_row": float(column_diff / row_diff), **bands}


def sample_rows(model: str, args: argparse.Namespace, timesteps: list[int] | None, real: torch.Tensor) -> dict:
    """The model's class-balanced samples measured; for each size of --levels also the output and the real
    images pooled to it and a nested model's own level of that size."""
    pipe = MatryoshkaPipeline.from_pretrained(model)
    labels = [i % 10 for i in range(args.samples)]
    batches = []
    for i in range(0, args.samples, 100):
        condition = ({"prompt": [caption_for_label(c, random.Random(j)) for j, c in enumerate(labels[i:i + 100])]}
                     if pipe.is_text_conditional else {"class_labels": labels[i : i + 100]})
        batches.append(pipe(**condition, num_inference_steps=args.steps, timesteps=timesteps,
                            guidance_scale=args.guidance, generator=i, progress=False).tensors)
    levels = [torch.cat([batch[level] for batch in batches]) for level in range(len(batches[0]))]
    rows = {model: anisotropy(levels[0])}
    by_size = {level.shape[-1]: level for level in levels[1:]}
    for size in args.levels:
        factor = real.shape[-1] // size
        rows[f"real test images pooled to {size} px"] = anisotropy(downsample(real, factor))
        if size in by_size:
            rows[f"{model}: its {size} px level"] = anisotropy(by_size[size])
        rows[f"{model}: output pooled to {size} px"] = anisotropy(downsample(levels[0], factor))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True,
                        help="model directories (class-conditional, or text models prompted with Fashion captions)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=32, help="side of the real images (the models' top level)")
    parser.add_argument("--fit", default="pad", choices=["pad", "resize"], help="how 28 px images reach --size")
    parser.add_argument("--timesteps", default=None,
                        help="a custom time grid, comma-separated, ending at 0 (instead of --steps)")
    parser.add_argument("--levels", type=int, nargs="*", default=[],
                        help="sizes (px): the output pooled to each, and a nested model's level of that size")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        timesteps = [int(v) for v in args.timesteps.split(",")] if args.timesteps else None
    except ValueError:
        parser.error(f"--timesteps {args.timesteps}: give integers separated by commas, ending at 0")
    if timesteps is not None and timesteps[-1] != 0:
        parser.error(f"--timesteps {args.timesteps}: the grid must end at 0 (the clean image)")
    if bad := [size for size in args.levels if size < 1 or args.size % size]:
        parser.error(f"--levels {bad[0]}: each size must divide --size {args.size}")
    data = FashionMNIST("test", image_size=args.size, channels=1, fit=args.fit)
    rng = np.random.default_rng(0)
    real = torch.stack([data.image_tensor(int(i)) for i in rng.choice(len(data), args.samples, replace=False)])
    rows = {"real test images": anisotropy(real)}
    for model in args.models:
        rows.update(sample_rows(model, args, timesteps, real))

    band_names = [f"band_{lo:g}_{hi:g}" for lo, hi in BANDS]
    print("| images | HF energy, horizontal / vertical (median) | column step | row step | column / row | "
          + " | ".join(f"energy {lo:g}-{hi:g}" for lo, hi in BANDS) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(BANDS))
    for name, r in rows.items():
        print(f"| {name} | {r['hf_ratio_median']:.2f} | {r['column_step']:.3f} | {r['row_step']:.3f} "
              f"| {r['column_over_row']:.2f} | " + " | ".join(f"{r[b]:.4f}" for b in band_names) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
