"""The paper's central ablation, small: does the nested multi-resolution loss (and progressive training)
help, at equal parameters and equal training compute? Fashion-MNIST 32x32, class-conditional.

    (a) configs/ablation_a.yaml  single-resolution UNet (a one-level NestedUNet at 32 px)
    (b) configs/ablation_b.yaml  NestedUNet 32/16, top-level loss only (level_weights [1, 0])
    (c) configs/ablation_c.yaml  NestedUNet 32/16, multi-resolution loss (level_weights [1, 1])
    (d) configs/ablation_d.yaml  (c) trained progressively: 16 px core alone, then nested

Training goes through the project's trainer (`matryoshka train CONFIG --out DIR --max-steps N`, resumed
exactly from one evaluation point to the next), evaluation through `matryoshka.evaluation.run` (what
`matryoshka eval` runs): FID/KID/precision-recall against Fashion-MNIST test images with the standard
FID InceptionV3, and the conditioning accuracy of a Fashion-MNIST classifier.

Compute is matched in training FLOPs, measured with torch's FlopCounterMode on one forward + backward
of each stage's model at its batch size (convolutions and matrix products): arms (a)-(c) take the same
number of steps at the same batch (so see the same images; (a)'s step is ~11% cheaper, reported), and
(d)'s step counts are set so that its cheaper core-only steps plus its nested steps add up to (c)'s
FLOPs. Every arm is evaluated at the same fractions of its FLOP budget.

    python benchmarks/ablation.py --classifier runs/fashion-classifier      # ~75 min on 2 busy cores
    python benchmarks/ablation.py --quick                                   # a 2-minute smoke run

Outputs: RUNS/<arm>/ (the training run, eval/step-N/report.json + sample grids), RUNS/results.json,
RUNS/table.md, and the plot (--plot, default docs/ablation_fid.png; not written by --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from matryoshka.evaluation import write_json_report
from matryoshka.evaluation.run import EvalSettings, Evaluator, distribution_metrics
from matryoshka.models import NestedUNet
from matryoshka.training import load_train_config
from matryoshka.training.config import TrainConfig
from matryoshka.training.loop import diffusion_loss
from matryoshka.training.stages import stage_mdm_config

ROOT = Path(__file__).resolve().parent.parent
ARMS: dict[str, str] = {
    "a": "(a) single-resolution UNet",
    "b": "(b) NestedUNet, top-level loss",
    "c": "(c) NestedUNet, multi-resolution loss",
    "d": "(d) (c) + progressive training",
}


def config_path(arm: str) -> Path:
    return ROOT / "configs" / f"ablation_{arm}.yaml"


# ---------------------------------------------------------------------------------------------------
# Compute accounting


def training_step_flops(config: TrainConfig, stage_index: int) -> float:
    """FLOPs of one optimiser step of a stage: forward + backward of the trainer's loss at its batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    from matryoshka.diffusion import PyramidSchedule

    stage = config.stages[stage_index]
    mdm = stage_mdm_config(config, stage_index)
    model = NestedUNet(mdm.model)
    schedule = PyramidSchedule.from_config(mdm.diffusion, mdm.model.scales)
    batch = (stage.batch_size or config.data.batch_size) * config.optim.grad_accum
    final = config.mdm.model
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, final.in_channels, final.image_size, final.image_size, generator=generator) * 2 - 1
    t = torch.randint(0, schedule.num_train_steps, (batch,), generator=generator)
    noise = [torch.randn(batch, mdm.model.in_channels, s, s, generator=generator) for s in mdm.model.sizes]
    labels = {"labels": torch.randint(0, final.num_classes, (batch,), generator=generator)} if final.num_classes else {}
    with FlopCounterMode(display=False) as counter:
        loss = diffusion_loss(model, images, final.scales, t, noise, labels, schedule, mdm.diffusion)
        loss.total.mean().backward()
    return float(counter.get_total_flops())


@dataclass
class Budget:
    """Per-step FLOPs of each stage of a run and where each stage starts."""

    config: TrainConfig
    stage_flops: list[float]

    @property
    def bounds(self) -> list[int]:
        return self.config.stage_bounds()

    def stage_of(self, step: int) -> int:
        """The stage that trained step `step` (1-based: step s is the s-th optimiser step)."""
        for i in range(len(self.config.stages)):
            if step <= self.bounds[i + 1]:
                return i
        raise ValueError(f"step {step} is past the end of the run ({self.bounds[-1]})")

    def flops_until(self, step: int) -> float:
        total = 0.0
        for i, flops in enumerate(self.stage_flops):
            start, end = self.bounds[i], self.bounds[i + 1]
            total += max(0, min(step, end) - start) * flops
        return total

    def images_until(self, step: int) -> int:
        total = 0
        for i, stage in enumerate(self.config.stages):
            start, end = self.bounds[i], self.bounds[i + 1]
            total += max(0, min(step, end) - start) * (stage.batch_size or self.config.data.batch_size)
        return total * self.config.optim.grad_accum

    @property
    def total_flops(self) -> float:
        return self.flops_until(self.bounds[-1])

    def step_at_fraction(self, fraction: float) -> int:
        """The first step at which the run has spent `fraction` of its FLOPs (to rounding)."""
        target = fraction * self.total_flops
        for step in range(1, self.bounds[-1] + 1):
            if self.flops_until(step) >= target * (1 - 1e-9):
                return step
        return self.bounds[-1]

    def full_model_at(self, step: int) -> bool:
        """Whether the model exported at `step` has every level (so it samples the top resolution)."""
        return self.config.stages[self.stage_of(step)].levels == self.config.mdm.model.num_levels


# ---------------------------------------------------------------------------------------------------
# Training (through `matryoshka train`) and evaluation


def train_until(config: Path, run_dir: Path, step: int, overrides: list[str], threads: int) -> tuple[float, list[str]]:
    """Run `matryoshka train` up to global step `step`, resuming the run in `run_dir` if it has one."""
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    command = ["matryoshka", "train", str(config.relative_to(ROOT)), "--out", str(run_dir), "--max-steps", str(step)]
    command += ["--resume"] if resume else []
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "matryoshka.cli", *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, command


def latest_checkpoint_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def real_data_row(evaluator: Evaluator, num: int, seed: int) -> dict:
    """The metrics of `num` real Fashion-MNIST *train* images against the test reference: the floor that
    FID at this sample count cannot go below (its small-N bias), for reading the models' numbers."""
    from matryoshka.data import FashionMNIST

    dataset = FashionMNIST("train", image_size=32, channels=1)
    indices = np.random.default_rng(seed).choice(len(dataset), num, replace=False)
    images = torch.stack([dataset.image_tensor(int(i)) for i in indices])
    settings = evaluator.settings
    features = evaluator.inception().extract(images, batch_size=settings.batch_size, progress=evaluator.progress)
    metrics = distribution_metrics(
        features, evaluator.reference(32, 1), settings.kid_subsets, settings.kid_subset_size, settings.pr_k, seed
    )
    kid = metrics.pop("kid")
    return {"arm": "real", "label": f"{num} real train images", **metrics, "kid": kid["mean"], "kid_std": kid["std"]}


def run_arm(
    arm: str, args: argparse.Namespace, evaluator: Evaluator, overrides: list[str], fractions: list[float]
) -> list[dict]:
    """Train `arm` up to each fraction of its FLOP budget in turn and evaluate it there."""
    config = load_train_config(config_path(arm), overrides)
    budget = Budget(config, [training_step_flops(config, i) for i in range(len(config.stages))])
    params = sum(p.numel() for p in NestedUNet(config.mdm.model).parameters())
    run_dir = args.runs / arm
    rows: list[dict] = []
    for fraction in fractions:
        step = budget.step_at_fraction(fraction)
        row = {
            "arm": arm, "label": ARMS[arm], "fraction": fraction, "step": step, "parameters": params,
            "images_seen": budget.images_until(step), "train_tflops": budget.flops_until(step) / 1e12,
            "step_gflops": [f / 1e9 for f in budget.stage_flops], "stage": budget.stage_of(step),
        }
        if not budget.full_model_at(step):
            print(f"[{arm}] step {step}: still in the core-only stage, no 32 px model to score", flush=True)
            rows.append({**row, "fid": None, "note": "core-only stage: no 32 px model yet"})
            continue
        eval_dir = run_dir / "eval" / f"step-{step:07d}"
        if (eval_dir / "report.json").is_file():
            report = json.loads((eval_dir / "report.json").read_text())
            print(f"[{arm}] step {step}: already evaluated (FID {report['fid']:.2f})", flush=True)
        else:
            if latest_checkpoint_step(run_dir) > step:
                raise RuntimeError(f"{run_dir} is past step {step} but has no report for it: use a new --runs")
            seconds, command = train_until(config_path(arm), run_dir, step, overrides, args.threads)
            print(f"[{arm}] trained to step {step} in {seconds:.0f} s: {' '.join(command)}", flush=True)
            from matryoshka.pipeline import MatryoshkaPipeline

            started = time.perf_counter()
            pipe = MatryoshkaPipeline.from_pretrained(run_dir / "model")
            report = evaluator.evaluate(pipe, eval_dir, model_name=f"{run_dir / 'model'} (step {step})")
            report["train_segment_s"] = seconds
            report["eval_s"] = time.perf_counter() - started
            write_json_report(report, eval_dir / "report.json")
            print(
                f"[{arm}] step {step}: FID {report['fid']:.2f}  KID {report['kid']['mean']:.4f}  "
                f"acc {report['conditioning']['accuracy']}  ({report['eval_s']:.0f} s)",
                flush=True,
            )
        rows.append({
            **row, "fid": report["fid"], "kid": report["kid"]["mean"], "kid_std": report["kid"]["std"],
            "precision": report["precision"], "recall": report["recall"],
            "accuracy": report["conditioning"]["accuracy"], "train_segment_s": report.get("train_segment_s"),
            "eval_s": report.get("eval_s"),
        })
    return rows


# ---------------------------------------------------------------------------------------------------
# Reporting


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| arm | params | step | images seen | train TFLOP | FID | KID x1000 (± std) | precision | recall "
        "| class acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kid = f"{1000 * r['kid']:.1f} ± {1000 * r['kid_std']:.1f}" if r.get("kid") is not None else "-"
        if r["arm"] == "real":
            lines.append(
                f"| {r['label']} | - | - | - | - | {r['fid']:.1f} | {kid} | {r['precision']:.3f} "
                f"| {r['recall']:.3f} | - |"
            )
            continue
        fid = f"{r['fid']:.1f}" if r.get("fid") is not None else "(core only)"
        acc = f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else "-"
        pr = (f"{r['precision']:.3f}", f"{r['recall']:.3f}") if r.get("fid") is not None else ("-", "-")
        lines.append(
            f"| {r['label']} | {r['parameters']:,} | {r['step']} | {r['images_seen']:,} | {r['train_tflops']:.1f} "
            f"| {fid} | {kid} | {pr[0]} | {pr[1]} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    by_steps, by_flops = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for arm, label in ARMS.items():
        points = [r for r in rows if r["arm"] == arm and r.get("fid") is not None]
        if not points:
            continue
        by_steps.plot([r["step"] for r in points], [r["fid"] for r in points], marker="o", label=label)
        by_flops.plot([r["train_tflops"] for r in points], [r["fid"] for r in points], marker="o", label=label)
    real = [r for r in rows if r["arm"] == "real"]
    for axes in (by_steps, by_flops):
        if real:
            axes.axhline(real[0]["fid"], color="grey", linestyle="--", linewidth=1, label=real[0]["label"])
        axes.set_ylabel("FID (lower is better)")
        axes.grid(True, alpha=0.3)
    by_steps.set_xlabel("training step (optimiser steps, batch 32)")
    by_flops.set_xlabel("training compute (TFLOP, forward + backward)")
    by_steps.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def write_results(args: argparse.Namespace, rows: list[dict], elapsed: float) -> str:
    """RUNS/results.json and RUNS/table.md (rewritten after every evaluation point); returns the table."""
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_json_report({"settings": settings, "rows": rows, "wall_s": elapsed}, args.runs / "results.json")
    table = markdown_table(sorted(rows, key=lambda r: (r["arm"] != "real", r["arm"], r.get("step") or 0)))
    (args.runs / "table.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation", help="training runs and reports")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0],
                        help="evaluation points, as fractions of each arm's training FLOPs")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--num-reference", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--kid-subset-size", type=int, default=100)
    parser.add_argument("--kid-subsets", type=int, default=50)
    parser.add_argument("--classifier", type=Path, default=None,
                        help="a saved Fashion-MNIST classifier (default: trained on the fly and cached)")
    parser.add_argument("--no-real-baseline", action="store_true", help="skip scoring real train images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training and evaluation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "ablation_fid.png")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/100 of the steps, 20 samples")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.quick:
        args.runs = args.runs.with_name(args.runs.name + "-quick")
        args.num_samples, args.num_reference, args.kid_subset_size, args.steps = 20, 40, 10, 4
    settings = EvalSettings(
        num_samples=args.num_samples, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=100,
        num_reference=args.num_reference, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
    )
    evaluator = Evaluator(settings, classifier_dir=args.classifier, progress=False)
    started = time.perf_counter()
    rows: list[dict] = []
    args.runs.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, list[str]] = {arm: [] for arm in args.arms}
    if args.quick:  # 1/100 of every stage's steps (at least 2)
        for arm in args.arms:
            config = load_train_config(config_path(arm))
            overrides[arm] = [f"stages.{i}.steps={max(2, s.steps // 100)}" for i, s in enumerate(config.stages)]
    # Breadth first: every arm reaches an evaluation point before any goes on to the next, so an
    # interrupted run still compares all arms at equal compute (and a rerun continues where it stopped).
    for fraction in args.fractions:
        for arm in args.arms:
            rows.extend(run_arm(arm, args, evaluator, overrides[arm], [fraction]))
            write_results(args, rows, time.perf_counter() - started)
    if not args.no_real_baseline:
        real_path = args.runs / f"real-{args.num_samples}-seed{args.seed}.json"
        if real_path.is_file():
            rows.append(json.loads(real_path.read_text()))
        else:
            rows.append(real_data_row(evaluator, args.num_samples, args.seed))
            write_json_report(rows[-1], real_path)
        print(f"real train images: FID {rows[-1]['fid']:.2f}  KID {rows[-1]['kid']:.4f}", flush=True)
    rows.sort(key=lambda r: (r["arm"] != "real", r["arm"], r.get("step") or 0))
    elapsed = time.perf_counter() - started
    table = write_results(args, rows, elapsed)
    print(table)
    print(f"total wall time {elapsed / 60:.1f} min (this invocation); results in {args.runs}")
    if not args.quick:
        plot(rows, args.plot, f"Fashion-MNIST 32x32, class-conditional: FID of {args.num_samples} samples "
             f"({args.steps} DDIM steps, guidance {args.guidance}) vs {args.num_reference} test images")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
