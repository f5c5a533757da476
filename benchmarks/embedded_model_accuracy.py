"""Does the embedded text-to-image model draw what the prompt names? Per-class accuracy vs guidance.

For each of the ten Fashion-MNIST classes, `--samples-per-class` prompts naming that class (captions
from the training templates, drawn with a fixed seed, so wordings vary) are sampled with the pipeline;
the Fashion-MNIST classifier (benchmarks/train_fashion_classifier.py) then says which class each image
shows. Every guidance scale uses the same prompts and the same initial noise, so the differences come
from guidance alone.

    python benchmarks/train_fashion_classifier.py --out runs/fashion-classifier --epochs 3
    python benchmarks/embedded_model_accuracy.py --classifier runs/fashion-classifier --guidance 1 3 7.5
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from matryoshka.commands.generate import default_model_dir
from matryoshka.data import CLASS_NAMES, caption_for_label, make_grid
from matryoshka.evaluation.classifier import conditioning_accuracy, load_classifier
from matryoshka.pipeline import MatryoshkaPipeline


def prompts_for_classes(samples_per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """`samples_per_class` captions naming each class (class-major order) and their labels."""
    prompts, labels = [], []
    for label in range(len(CLASS_NAMES)):
        for k in range(samples_per_class):
            prompts.append(caption_for_label(label, random.Random(f"eval/{seed}/{label}/{k}")))
            labels.append(label)
    return prompts, labels


def generate_all(
    pipe: MatryoshkaPipeline, prompts: list[str], guidance: float, steps: int, seed: int, batch_size: int
) -> torch.Tensor:
    """Top-level samples (N, C, S, S) in [-1, 1]; batch b uses seed + b, whatever the guidance."""
    images = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        out = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=seed + b,
            progress=False,
        )
        images.append(out.tensors[0])
    return torch.cat(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--classifier", type=Path, required=True, help="a saved Fashion-MNIST classifier directory")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (and grids beside it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model or default_model_dir()
    pipe = MatryoshkaPipeline.from_pretrained(model_dir)
    classifier = load_classifier(args.classifier)
    prompts, labels = prompts_for_classes(args.samples_per_class, args.seed)
    print(f"model {model_dir}; {len(prompts)} prompts ({args.samples_per_class} per class), {args.steps} DDIM steps")

    results = []
    for guidance in args.guidance:
        started = time.perf_counter()
        images = generate_all(pipe, prompts, guidance, args.steps, args.seed, args.batch_size)
        seconds = time.perf_counter() - started
        if images.shape[1] == 3 and classifier.config.in_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        overall, per_class = conditioning_accuracy(classifier, images, labels)
        results.append(
            {
                "guidance": guidance,
                "accuracy": overall,
                "per_class": {CLASS_NAMES[c]: per_class[c] for c in sorted(per_class)},
                "sampling_seconds": seconds,
            }
        )
        print(f"guidance {guidance:g}: accuracy {overall:.3f} ({seconds:.0f} s to sample)")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # One row per class: the first 10 samples of each.
            per_row = min(10, args.samples_per_class)
            rows = [images[c * args.samples_per_class : c * args.samples_per_class + per_row] for c in range(10)]
            make_grid(torch.cat(rows), nrow=per_row).save(args.out.with_name(f"{args.out.stem}.w{guidance:g}.png"))

    header = f"{'class':<12}" + "".join(f"{'w=' + format(r['guidance'], 'g'):>8}" for r in results)
    print(header)
    for name in CLASS_NAMES:
        print(f"{name:<12}" + "".join(f"{r['per_class'][name]:>8.2f}" for r in results))
    print(f"{'all':<12}" + "".join(f"{r['accuracy']:>8.3f}" for r in results))
    if args.out is not None:
        report = {
            "model": str(model_dir),
            "classifier": str(args.classifier),
            "samples_per_class": args.samples_per_class,
            "steps": args.steps,
            "sampler": "ddim",
            "seed": args.seed,
            "threads": args.threads,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
