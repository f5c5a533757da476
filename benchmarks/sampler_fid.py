"""Few-step sampling and guidance judged by FID: every sampler at several step counts, with and without a
guidance interval, guidance rescale or autoguidance, network evaluations counted.

    python benchmarks/sampler_fid.py --model runs/study/study32/c/seed0/model --out runs/sampler-fid/c
    python benchmarks/sampler_fid.py --model fashion-t2i --samplers ddim dpmpp_2m --steps 8 20 --seeds 0 1

Each setting (sampler, steps, interval, sampling seed) is scored once by `matryoshka.evaluation.run`
(FID/KID against Fashion-MNIST test images, the fidelity classifier) and its report kept in OUT, so a rerun
skips what is done. NFE counts network rows per sample: a guided step costs two (both branches in one
batch), a step outside the guidance interval one; Heun calls the network twice per step but the last.
Writes OUT/table.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from matryoshka.evaluation import write_json_report
from matryoshka.evaluation.run import EvalSettings, Evaluator
from matryoshka.guidance import GuidanceInterval
from matryoshka.pipeline import MatryoshkaPipeline, available_samplers


class GuidedPipeline:
    """A pipeline whose calls carry the guidance options and count network rows (what Evaluator calls)."""

    def __init__(self, pipe: MatryoshkaPipeline, **guidance) -> None:
        self.pipe, self.guidance, self.rows, self.images = pipe, guidance, 0, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, **self.guidance, **kwargs)
        if out.evaluations is not None:
            self.rows += out.evaluations["network_rows"] + out.evaluations["guide_rows"]
        self.images += len(out.tensors[0])
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model directory, a bundled name or a hub id")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samplers", nargs="+", default=available_samplers(), choices=available_samplers())
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 8, 12, 20, 50])
    parser.add_argument("--interval", default="none,0.3:5",
                        help="comma-separated guidance intervals in sigma, LO:HI, or 'none' (default none,0.3:5)")
    parser.add_argument("--rescale", type=float, nargs="+", default=[0.0], help="guidance rescale values")
    parser.add_argument("--guide-model", default=None, help="also score autoguidance with this weaker model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-reference", type=int, default=2000)
    parser.add_argument("--fit", default="auto", choices=["auto", "pad", "resize"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from matryoshka.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    pipe = MatryoshkaPipeline.from_pretrained(args.model)
    guidance = args.guidance if args.guidance is not None else pipe.config.sampling.guidance_scale
    intervals: dict[str, GuidanceInterval | None] = {}
    for text in args.interval.split(","):
        text = text.strip()
        if text == "none":
            intervals["none"] = None
        else:
            low, high = (float(v) for v in text.split(":"))
            intervals[f"sigma {low:g}..{high:g}"] = GuidanceInterval(low, high)
    guide = MatryoshkaPipeline.from_pretrained(args.guide_model) if args.guide_model else None
    variants = [(f"{name}" + (f", rescale {r:g}" if r else ""), {"guidance_interval": interval,
                                                                 "guidance_rescale": r})
                for name, interval in intervals.items() for r in args.rescale]
    if guide is not None:
        variants.append(("autoguidance", {"guide_model": guide}))
    evaluators: dict[int, Evaluator] = {}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for sampler in args.samplers:
            for steps in args.steps:
                for name, options in variants:
                    slug = name.replace(" ", "").replace("..", "-").replace(",", "-")
                    tag = f"{sampler}-{steps}-{slug}-seed{seed}"
                    path = args.out / tag / "report.json"
                    if path.is_file():
                        report = json.loads(path.read_text())
                    else:
                        settings = EvalSettings(num_samples=args.num_samples, steps=steps, guidance=guidance,
                                                sampler=sampler, seed=seed, batch_size=250,
                                                num_reference=args.num_reference, kid_subsets=50,
                                                kid_subset_size=500, fit=args.fit)
                        evaluator = evaluators.setdefault(seed, Evaluator(settings, progress=False))
                        evaluator.settings = settings
                        counted = GuidedPipeline(pipe, **options)
                        started = time.perf_counter()
                        report = evaluator.evaluate(counted, path.parent, model_name=str(args.model))
                        report["nfe_per_sample"] = counted.rows / max(1, counted.images)
                        report["interval"] = name
                        report["wall_s"] = time.perf_counter() - started
                        write_json_report(report, path)
                    rows.append({"sampler": sampler, "steps": steps, "interval": name, "seed": seed,
                                 "nfe": report["nfe_per_sample"], "fid": report["fid"], "kid": report["kid"]["mean"],
                                 "accuracy": report["conditioning"]["accuracy"]})
                    print(f"{sampler:9s} {steps:3d} steps  {name:14s} seed {seed}: NFE {rows[-1]['nfe']:5.1f}  "
                          f"FID {rows[-1]['fid']:6.2f}  acc {rows[-1]['accuracy']}", flush=True)
    write_json_report({"model": str(args.model), "guidance": guidance, "rows": rows}, args.out / "results.json")
    lines = ["| sampler | steps | guidance | NFE / sample | FID | KID x1000 | class acc. |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.1%}"
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['interval']} | {row['nfe']:.1f} | {row['fid']:.1f} "
                     f"| {1000 * row['kid']:.2f} | {accuracy} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
