"""Few-step sampling and guidance judged by FID: every sampler at several step counts, with and without a
guidance interval, guidance rescale or autoguidance, network evaluations counted.

    python benchmarks/sampler_fid.py --model runs/study/study32/c/seed0/model --out runs/sampler-fid/c
    python benchmarks/sampler_fid.py --model fashion-t2i --samplers ddim dpmpp_2m --steps 8 20 --seeds 0 1

Each setting (sampler, steps, interval, sampling seed) is scored once by `matryoshka.evaluation.run`
(FID/KID against Fashion-MNIST test images, the fidelity classifier) and its report kept in OUT, so a rerun
skips what is done (`--report` tabulates everything scored in OUT so far, over several runs). The table
gives each setting's FID as mean ± half-range over the sampling seeds, and names the cheapest setting
within DDIM-50's seed spread of its FID (issue 15's "documented fast setting"). NFE counts network rows
per sample: a guided step costs two (both branches in one batch), a step outside the guidance interval
one; Heun calls the network twice per step but the last.
Writes OUT/table.md and OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
                        help="comma-separated guidance intervals in sigma, LO:HI, or 'none' (default none,0.3:5); "
                        "'' with --guide-model: autoguidance only")
    parser.add_argument("--rescale", type=float, nargs="+", default=[0.0], help="guidance rescale values")
    parser.add_argument("--guide-model", default=None, help="also score autoguidance with this weaker model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-reference", type=int, default=2000)
    parser.add_argument("--fit", default="auto", choices=["auto", "pad", "resize"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true",
                        help="only tabulate every setting scored so far in OUT (several runs' worth)")
    args = parser.parse_args()
    if args.report:
        rows = report_rows(args.out)
        if not rows:
            parser.error(f"--report: no scored settings under {args.out}")
        return write_results(args.out, rows, {"model": str(args.model)})
    torch.set_num_threads(args.threads)
    from matryoshka.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    pipe = MatryoshkaPipeline.from_pretrained(args.model)
    guidance = args.guidance if args.guidance is not None else pipe.config.sampling.guidance_scale
    intervals: dict[str, GuidanceInterval | None] = {}
    for text in filter(None, (part.strip() for part in args.interval.split(","))):
        if text == "none":
            intervals["none"] = None
        else:
            low, high = (float(v) for v in text.split(":"))
            intervals[f"sigma {low:g}..{high:g}"] = GuidanceInterval(low, high)
    if not intervals and not args.guide_model:
        parser.error("--interval '' leaves nothing to score without --guide-model")
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
                        report.update(sampler=sampler, steps=steps, seed=seed)
                        write_json_report(report, path)
                    rows.append(row_of(report, sampler, steps, seed))
                    print(f"{sampler:9s} {steps:3d} steps  {name:14s} seed {seed}: NFE {rows[-1]['nfe']:5.1f}  "
                          f"FID {rows[-1]['fid']:6.2f}  acc {rows[-1]['accuracy']}", flush=True)
    write_results(args.out, rows, {"model": str(args.model), "guidance": guidance})


def row_of(report: dict, sampler: str, steps: int, seed: int) -> dict:
    return {"sampler": sampler, "steps": steps, "interval": report["interval"], "seed": seed,
            "nfe": report["nfe_per_sample"], "fid": report["fid"], "kid": report["kid"]["mean"],
            "accuracy": report["conditioning"]["accuracy"]}


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (sampler, steps, guidance variant): FID and KID mean and half-range over the
    sampling seeds, NFE and class accuracy means; in the order the settings first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["sampler"], row["steps"], row["interval"]), []).append(row)
    summary = []
    for (sampler, steps, interval), group in groups.items():
        fids = [r["fid"] for r in group]
        accuracies = [r["accuracy"] for r in group if r["accuracy"] is not None]
        summary.append({"sampler": sampler, "steps": steps, "interval": interval, "seeds": len(group),
                        "nfe": statistics.fmean(r["nfe"] for r in group), "fid": statistics.fmean(fids),
                        "fid_spread": (max(fids) - min(fids)) / 2,
                        "kid": statistics.fmean(r["kid"] for r in group),
                        "accuracy": statistics.fmean(accuracies) if accuracies else None})
    return summary


def fast_setting(summary: list[dict], reference: tuple = ("ddim", 50, "none")) -> dict | None:
    """The cheapest setting (fewest network rows per sample; then the lower FID) whose mean FID is within
    the reference's sampling-seed spread of the reference's mean (at or below mean + half-range). None
    when the reference was not scored."""
    ref = next((s for s in summary if (s["sampler"], s["steps"], s["interval"]) == reference), None)
    if ref is None:
        return None
    within = [s for s in summary if s["fid"] <= ref["fid"] + ref["fid_spread"]]
    return min(within, key=lambda s: (s["nfe"], s["fid"]))


def markdown(summary: list[dict]) -> str:
    lines = ["| sampler | steps | guidance | NFE / sample | seeds | FID | KID x1000 | class acc. |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.1%}"
        fid = f"{s['fid']:.1f}" + (f" ± {s['fid_spread']:.1f}" if s["seeds"] > 1 else "")
        lines.append(f"| {s['sampler']} | {s['steps']} | {s['interval']} | {s['nfe']:.1f} | {s['seeds']} | {fid} "
                     f"| {1000 * s['kid']:.2f} | {accuracy} |")
    fast = fast_setting(summary)
    if fast is not None:
        lines += ["", f"Fastest setting within DDIM-50's seed spread: {fast['sampler']}, {fast['steps']} steps, "
                      f"guidance {fast['interval']} (NFE {fast['nfe']:.1f}, FID {fast['fid']:.1f})."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """OUT/results.json (every scored run) and OUT/table.md (per setting, mean ± half-range over seeds)."""
    summary = summarize(rows)
    write_json_report({**meta, "rows": rows, "summary": summary}, out / "results.json")
    table = markdown(summary)
    (out / "table.md").write_text(table)
    print(table)


def report_rows(out: Path) -> list[dict]:
    """The rows of every report under OUT (what --report tabulates), sorted by setting and seed."""
    rows = []
    for path in sorted(out.glob("*/report.json")):
        report = json.loads(path.read_text())
        if "sampler" in report:
            rows.append(row_of(report, report["sampler"], report["steps"], report["seed"]))
    order = {name: i for i, name in enumerate(available_samplers())}
    return sorted(rows, key=lambda r: (order.get(r["sampler"], 99), r["steps"], r["interval"], r["seed"]))


if __name__ == "__main__":
    main()
