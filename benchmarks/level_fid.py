"""Where a nested model's samples lose: FID of every level, and of the top level seen at lower sizes.

For each model: N class-balanced samples (all levels), then FID/KID of
- each level's own output (level r against the reference test images average-pooled to its size), and
- the top level average-pooled to every lower size (its coarse structure);
against the same reference at the same size. A single-resolution model only has the second kind, which
makes the comparison fair: if a nested model's 16 px core is worse than a plain UNet's output seen at 16 px,
the coarse structure is what loses; if they agree but the top level is worse, the detail band does.
With --pin-real, the nested model also samples its top level with the low level pinned to real test images
(init_image, super-resolution): the top band's quality given a perfect core.

    python benchmarks/level_fid.py --models runs/study/diagnose32/a/seed0/model runs/study/diagnose32/c/seed0/model
    python benchmarks/level_fid.py --fit resize --pin-real --models runs/study/study64/c/seed0/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from matryoshka.data import FashionMNIST
from matryoshka.evaluation.inception import InceptionFeatureExtractor
from matryoshka.evaluation.run import cached_reference, default_cache_dir, distribution_metrics
from matryoshka.pipeline import MatryoshkaPipeline


def pooled(images: torch.Tensor, size: int) -> torch.Tensor:
    return images if images.shape[-1] == size else F.avg_pool2d(images, images.shape[-1] // size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--pin-real", action="store_true", help="also pin the lowest level to real images")
    parser.add_argument("--fit", choices=["pad", "resize"], default="pad",
                        help="how the 28 px test images reach the models' size: as the models were trained")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        pipes = {model: MatryoshkaPipeline.from_pretrained(model) for model in args.models}
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--models: {error}")
    top_sizes = {pipe.config.model.sizes[0] for pipe in pipes.values()}
    if len(top_sizes) != 1:
        parser.error(f"--models: every model must have the same top size, got {sorted(top_sizes)} px")
    top = top_sizes.pop()
    torch.set_num_threads(1)
    from matryoshka.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    extractor = InceptionFeatureExtractor()
    test = FashionMNIST("test", image_size=top, channels=1, fit=args.fit)
    real = torch.stack([test.image_tensor(i) for i in range(args.reference)])
    references = {}

    def reference(size: int):
        if size not in references:
            description = {"reference": "fashion_mnist/test pooled", "size": size, "n": len(real),
                           "fit": f"{args.fit}{top}"}
            references[size] = cached_reference(extractor, lambda: pooled(real, size), description,
                                                default_cache_dir(), progress=False)
        return references[size]

    def score(images: torch.Tensor, size: int) -> dict:
        features = extractor.extract(images, batch_size=100, progress=False)
        metrics = distribution_metrics(features, reference(size), kid_subsets=20, kid_subset_size=500)
        return {"fid": metrics["fid"], "kid": metrics["kid"]["mean"]}

    labels = [i % 10 for i in range(args.samples)]
    results: dict = {}
    for model, pipe in pipes.items():
        levels = []
        for start in range(0, args.samples, 250):
            out = pipe(class_labels=labels[start : start + 250], num_inference_steps=args.steps,
                       guidance_scale=args.guidance, generator=start, progress=False)
            levels.append(out.tensors)
        tensors = [torch.cat([batch[r] for batch in levels]) for r in range(len(levels[0]))]
        row = {}
        sizes = [top >> k for k in range(top.bit_length()) if top >> k >= 16]
        for size in sizes:
            row[f"top seen at {size} px"] = score(pooled(tensors[0], size), size)
        for r, level in enumerate(tensors[1:], start=1):
            row[f"level {r} ({level.shape[-1]} px) output"] = score(level, level.shape[-1])
        if args.pin_real and len(tensors) > 1:
            low = pipe.config.model.sizes[-1]
            pinned = []
            for start in range(0, args.samples, 250):  # each sample pins its own real picture (and class)
                images = pooled(real[start : start + 250], low)
                classes = [int(c) for c in test.labels[start : start + len(images)]]
                pinned.append(pipe(class_labels=classes, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                   generator=start, progress=False, init_image=images,
                                   init_level=len(tensors) - 1).tensors[0])
            row["top, low level pinned to real images"] = score(torch.cat(pinned), top)
        results[model] = row
        print(model, json.dumps(row), flush=True)
    sizes = sorted({k for row in results.values() for k in row})
    print("| model | " + " | ".join(sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for model, row in results.items():
        print(f"| {model} | " + " | ".join(f"{row[k]['fid']:.1f}" if k in row else "-" for k in sizes) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
