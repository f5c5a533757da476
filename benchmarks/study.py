"""The method study: does MDM beat single-resolution diffusion at equal compute, and which recipe wins?

A study is one YAML spec under configs/study/ (arms, training seeds, a training budget in FLOPs, the
points of that budget where every arm is scored, and the evaluation settings). Every arm is a training
config of the project plus `--set` overrides; its *last* stage is lengthened or shortened so that the
arm spends the study's budget (torch's FlopCounterMode count of one forward + backward of the trainer's
own loss, per stage, times the steps), so arms of different step costs and progressive schedules are
compared at equal training compute. An arm with an automatic stage (end_on_plateau) leaves that to the
trainer (`budget_tflops`: the last stage gets what the earlier ones left) and is scored at its full
budget only, where it ended.

    python benchmarks/study.py configs/study/study32.yaml                 # train + score everything
    python benchmarks/study.py configs/study/study32.yaml --plan          # print the jobs, run nothing
    python benchmarks/study.py configs/study/study32.yaml --report        # tables and plot from what exists

It resumes: each (arm, seed) is one run of `matryoshka train` (resumed exactly from one evaluation point
to the next), each evaluation point writes eval/step-N/report.json once, and a rerun skips what is done.
Work goes breadth first (every arm and seed reaches a point before any goes on), so a study cut short
still compares all arms at equal compute. Two invocations may run side by side (each takes a lock per
run and skips the runs the other holds); give each one thread (--threads 1).

Outputs under RUNS/<study name>/: <arm>/seed<k>/ (the training run and its eval/), real-*.json (the
floor: real training images scored like samples), results.json (every point, with the git commit and
the machine it came from) and table.md (mean and spread over seeds), plus the plot (--plot).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from matryoshka.evaluation import write_json_report
from matryoshka.evaluation.run import EvalSettings, Evaluator, distribution_metrics
from matryoshka.models import NestedUNet
from matryoshka.training import load_train_config
from matryoshka.training.checkpoint import read_state
from matryoshka.training.config import TrainConfig, steps_within_budget
from matryoshka.training.flops import training_step_flops
from matryoshka.training.loop import saved_stage_ends
from matryoshka.typed_config import ConfigError, load_yaml, require

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# The spec


@dataclass
class ArmSpec:
    """One arm: a training config and overrides (applied after the study's own)."""

    name: str  # short id, used as the run directory
    label: str  # what tables and plots call it
    config: str  # path of the training YAML, relative to the repository root
    set: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(self.name.replace("_", "").replace("-", "").isalnum(), "name", "letters, digits, - and _ only")


@dataclass
class StudySpec:
    name: str
    description: str
    arms: list[ArmSpec]
    budget_tflops: float  # training compute of every arm
    eval_fractions: list[float]  # points of the budget where each arm is scored
    seeds: list[int] = field(default_factory=lambda: [0])
    set: list[str] = field(default_factory=list)  # overrides for every arm
    eval: EvalSettings = field(default_factory=EvalSettings)
    real_floor: bool = True  # score eval.num_samples real training images the same way

    def validate(self) -> None:
        require(len(self.arms) >= 1, "arms", "needs at least one arm")
        names = [arm.name for arm in self.arms]
        require(len(set(names)) == len(names), "arms", f"names must be unique, got {names}")
        require(self.budget_tflops > 0, "budget_tflops", "must be positive")
        require(all(0 < f <= 1 for f in self.eval_fractions), "eval_fractions", "fractions must be in (0, 1]")
        require(self.eval_fractions == sorted(self.eval_fractions), "eval_fractions", "must be increasing")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", "distinct, at least one")

    def arm(self, name: str) -> ArmSpec:
        return next(arm for arm in self.arms if arm.name == name)


# ---------------------------------------------------------------------------------------------------
# Compute accounting


@dataclass
class Budget:
    """Per-step FLOPs of each stage of a run and where each stage starts."""

    config: TrainConfig
    stage_flops: list[float]
    ended: dict[int, int] = field(default_factory=dict)  # automatic stages that ended -> their steps

    @property
    def bounds(self) -> list[int]:
        return self.config.stage_bounds(self.ended, self.stage_flops)

    @property
    def stage_steps(self) -> list[int]:
        """The steps each stage runs (an automatic one: as far as its run has decided)."""
        bounds = self.bounds
        return [end - start for start, end in zip(bounds, bounds[1:], strict=False)]

    def stage_of(self, step: int) -> int:
        """The stage that trained step `step` (1-based: step s is the s-th optimiser step)."""
        bounds = self.bounds
        for i in range(len(self.config.stages)):
            if step <= bounds[i + 1]:
                return i
        raise ValueError(f"step {step} is past the end of the run ({bounds[-1]})")

    def flops_until(self, step: int) -> float:
        total, bounds = 0.0, self.bounds
        for i, flops in enumerate(self.stage_flops):
            start, end = bounds[i], bounds[i + 1]
            total += max(0, min(step, end) - start) * flops
        return total

    def images_until(self, step: int) -> int:
        total, bounds = 0, self.bounds
        for i, stage in enumerate(self.config.stages):
            start, end = bounds[i], bounds[i + 1]
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


def budget_overrides(config: TrainConfig, stage_flops: list[float], budget_flops: float) -> list[str]:
    """What makes the run spend `budget_flops`: its last stage's steps; or, where a stage may end on its
    plateau (so what the last stage gets is known only then), the trainer's own budget, the last stage
    allowed every step the budget could pay for."""
    last = len(config.stages) - 1
    if any(stage.end_on_plateau is not None for stage in config.stages):
        most = steps_within_budget(budget_flops, [0] * last, stage_flops)
        return [f"budget_tflops={budget_flops / 1e12!r}", f"stages.{last}.steps={most}"]
    steps = steps_within_budget(budget_flops, [stage.steps for stage in config.stages[:-1]], stage_flops)
    return [f"stages.{last}.steps={steps}"]


@dataclass
class ArmPlan:
    """An arm made concrete for one training seed: its config, overrides and budget."""

    arm: ArmSpec
    seed: int
    overrides: list[str]
    config: TrainConfig
    budget: Budget
    parameters: int

    @property
    def config_path(self) -> Path:
        return ROOT / self.arm.config

    @property
    def automatic(self) -> bool:
        """Whether a stage may end on its plateau (so the run's length is known only when it has)."""
        return self.config.budget_tflops is not None

    def run_dir(self, runs: Path) -> Path:
        return runs / self.arm.name / f"seed{self.seed}"


def plan_arm(spec: StudySpec, arm: ArmSpec, seed: int, flops_cache: dict, runs: Path | None = None) -> ArmPlan:
    """The arm for `seed`, its last stage sized to the budget; an automatic arm's stage ends as far as its
    run under `runs` has decided them."""
    base = [*spec.set, *arm.set, f"seed={seed}"]
    config = load_train_config(ROOT / arm.config, base)
    key = (arm.config, tuple(spec.set), tuple(arm.set))  # the seed does not change FLOPs
    if key not in flops_cache:
        flops_cache[key] = [training_step_flops(config, i) for i in range(len(config.stages))]
    stage_flops = flops_cache[key]
    overrides = [*base, *budget_overrides(config, stage_flops, spec.budget_tflops * 1e12)]
    config = load_train_config(ROOT / arm.config, overrides)
    parameters = sum(p.numel() for p in NestedUNet(config.mdm.model).parameters())
    plan = ArmPlan(arm, seed, overrides, config, Budget(config, stage_flops), parameters)
    if plan.automatic and spec.eval_fractions != [1.0]:
        raise ConfigError(
            "eval_fractions", f"arm {arm.name} ends a stage on its plateau, so its points of the budget are known "
            "only when it has: score it at [1.0] only (a study of its own)",
        )
    if plan.automatic and runs is not None:
        plan.budget.ended = stage_ends(plan.run_dir(runs))
    return plan


# ---------------------------------------------------------------------------------------------------
# Training (through `matryoshka train`) and scoring


def latest_checkpoint_step(run_dir: Path) -> int:
    root = run_dir / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in root.glob("step-*") if p.name[5:].isdigit()] if root.is_dir() else []
    return max(steps, default=0)


def stage_ends(run_dir: Path) -> dict[int, int]:
    """The automatic stages that have ended in the run's newest checkpoint -> the steps they ran."""
    step = latest_checkpoint_step(run_dir)
    return saved_stage_ends(read_state(run_dir / "checkpoints" / f"step-{step:07d}")) if step else {}


def train_until(plan: ArmPlan, run_dir: Path, step: int, threads: int) -> tuple[float, list[str]]:
    """Run `matryoshka train` up to global step `step`, resuming the run in `run_dir` if it has one."""
    command = ["matryoshka", "train", plan.arm.config, "--out", str(run_dir), "--max-steps", str(step)]
    command += ["--resume"] if latest_checkpoint_step(run_dir) > 0 else []
    for item in plan.overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = run_child([sys.executable, "-m", "matryoshka.cli", *command[1:]], env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, command


def run_child(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a child process to its end; if the study is stopped meanwhile (Ctrl-C, or SIGTERM through
    `exit_on_sigterm`), stop the child too, so that no orphan keeps writing a run the lock no longer guards."""
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            stdout, stderr = child.communicate()
        except BaseException:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that `run_child` cleans up as it does on Ctrl-C."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Yields whether this process holds the run (another invocation of the study may be training it)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def provenance() -> dict:
    """The code and machine a result came from."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }


def point_row(plan: ArmPlan, step: int, fraction: float) -> dict:
    budget = plan.budget
    return {
        "arm": plan.arm.name, "label": plan.arm.label, "seed": plan.seed, "fraction": fraction, "step": step,
        "parameters": plan.parameters, "images_seen": budget.images_until(step),
        "train_tflops": budget.flops_until(step) / 1e12, "step_gflops": [f / 1e9 for f in budget.stage_flops],
        "stage": budget.stage_of(step), "stage_steps": budget.stage_steps,
    }


def report_path(runs: Path, plan: ArmPlan, step: int) -> Path:
    return plan.run_dir(runs) / "eval" / f"step-{step:07d}" / "report.json"


def score_point(plan: ArmPlan, step: int, fraction: float, runs: Path, evaluator: Evaluator, threads: int) -> dict:
    """Train the run to `step` (if needed) and score it there; the report is written once."""
    from matryoshka.pipeline import MatryoshkaPipeline

    run_dir = plan.run_dir(runs)
    path = report_path(runs, plan, step)
    if latest_checkpoint_step(run_dir) > step:
        raise RuntimeError(f"{run_dir} is past step {step} but has no report for it: score it from a copy")
    seconds, command = train_until(plan, run_dir, step, threads)
    if plan.automatic:  # its stage ends are known now: the run ended where its budget did
        plan.budget.ended = stage_ends(run_dir)
        step = plan.budget.bounds[-1]
        path = report_path(runs, plan, step)
    print(f"[{plan.arm.name}/seed{plan.seed}] trained to step {step} in {seconds:.0f} s", flush=True)
    started = time.perf_counter()
    pipe = MatryoshkaPipeline.from_pretrained(run_dir / "model")
    report = evaluator.evaluate(pipe, path.parent, model_name=f"{run_dir / 'model'} (step {step})")
    report.update(train_segment_s=seconds, eval_s=time.perf_counter() - started, command=command, **provenance())
    write_json_report(report, path)
    print(
        f"[{plan.arm.name}/seed{plan.seed}] step {step}: FID {report['fid']:.2f}  KID {report['kid']['mean']:.4f}  "
        f"acc {report['conditioning']['accuracy']}  ({report['eval_s']:.0f} s)", flush=True,
    )
    return report


def earlier_points_scored(spec: StudySpec, plan: ArmPlan, step: int, runs: Path) -> bool:
    """Whether every evaluation point of this run before `step` has its report (or has no full model)."""
    for fraction in spec.eval_fractions:
        earlier = plan.budget.step_at_fraction(fraction)
        if earlier < step and plan.budget.full_model_at(earlier) and not report_path(runs, plan, earlier).is_file():
            return False
    return True


def row_from_report(plan: ArmPlan, step: int, fraction: float, report: dict | None) -> dict:
    row = point_row(plan, step, fraction)
    if not plan.budget.full_model_at(step):
        return {**row, "fid": None, "note": "core-only stage: no top-level model yet"}
    if report is None:
        return {**row, "fid": None, "note": "not scored yet"}
    return {
        **row, "fid": report["fid"], "kid": report["kid"]["mean"], "kid_std": report["kid"]["std"],
        "precision": report["precision"], "recall": report["recall"],
        "accuracy": report["conditioning"]["accuracy"], "train_segment_s": report.get("train_segment_s"),
        "eval_s": report.get("eval_s"), "commit": report.get("commit"), "dirty": report.get("dirty"),
    }


def real_floor(spec: StudySpec, evaluator: Evaluator, runs: Path, image_size: int, channels: int) -> dict:
    """The metrics of N real Fashion-MNIST *train* images against the reference: what FID at this N and
    reference reads for a perfect model (its small-N bias), so the arms' numbers can be read."""
    from matryoshka.data import FashionMNIST

    settings = spec.eval
    path = runs / f"real-{settings.num_samples}-seed{settings.seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    fit = settings.resolved_fit(image_size)
    dataset = FashionMNIST("train", image_size=image_size, channels=channels, fit=fit)
    indices = np.random.default_rng(settings.seed).choice(len(dataset), settings.num_samples, replace=False)
    images = torch.stack([dataset.image_tensor(int(i)) for i in indices])
    features = evaluator.inception().extract(images, batch_size=settings.batch_size, progress=evaluator.progress)
    metrics = distribution_metrics(
        features, evaluator.reference(image_size, channels), settings.kid_subsets, settings.kid_subset_size,
        settings.pr_k, settings.seed,
    )
    kid = metrics.pop("kid")
    row = {"arm": "real", "label": f"{settings.num_samples} real train images", **metrics, "kid": kid["mean"],
           "kid_std": kid["std"], **provenance()}
    write_json_report(row, path)
    return row


# ---------------------------------------------------------------------------------------------------
# Tables and the plot


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max - min) / 2 over seeds; 0 spread for one seed."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (arm, fraction): mean and spread over the seeds scored there."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        if row["arm"] != "real" and row.get("fid") is not None:
            groups.setdefault((row["arm"], row["fraction"]), []).append(row)
    out = []
    for (arm, fraction), members in groups.items():
        summary = {"arm": arm, "label": members[0]["label"], "fraction": fraction, "seeds": len(members),
                   "parameters": members[0]["parameters"], "train_tflops": statistics.fmean(
                       m["train_tflops"] for m in members), "step": members[0]["step"],
                   "images_seen": members[0]["images_seen"]}
        for key in ("fid", "kid", "precision", "recall", "accuracy"):
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                summary[key], summary[f"{key}_spread"] = _mean_spread(values)
        out.append(summary)
    return out


def markdown_tables(spec: StudySpec, rows: list[dict], real: dict | None) -> str:
    order = {arm.name: i for i, arm in enumerate(spec.arms)}
    summary = sorted(aggregate(rows), key=lambda r: (r["fraction"], order[r["arm"]]))
    seeds = ", ".join(str(s) for s in spec.seeds)
    lines = [
        f"Mean ± half-range over training seeds ({seeds}; the `seeds` column says how many were scored). "
        f"FID/KID: {spec.eval.num_samples} class-balanced samples ({spec.eval.sampler}, {spec.eval.steps} steps, "
        f"guidance {spec.eval.guidance}) against {spec.eval.num_reference} Fashion-MNIST test images.",
        "",
        "| arm | budget | step | images | train TFLOP | seeds | FID | KID x1000 | precision | recall | class acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if real:
        lines.append(
            f"| {real['label']} (floor) | - | - | - | - | - | {real['fid']:.1f} | {1000 * real['kid']:.2f} "
            f"| {real['precision']:.3f} | {real['recall']:.3f} | - |"
        )

    def cell(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        if r.get(key) is None:
            return "-"
        mean, spread = scale * r[key], scale * r.get(f"{key}_spread", 0.0)
        return f"{mean:{fmt}} ± {spread:{fmt}}" if r["seeds"] > 1 else f"{mean:{fmt}}"

    for r in summary:
        lines.append(
            f"| {r['label']} | {r['fraction']:g} | {r['step']} | {r['images_seen']:,} | {r['train_tflops']:.1f} "
            f"| {r['seeds']} | {cell(r, 'fid', '.1f')} | {cell(r, 'kid', '.2f', 1000)} | {cell(r, 'precision', '.3f')} "
            f"| {cell(r, 'recall', '.3f')} | {cell(r, 'accuracy', '.1%')} |"
        )
    lines += ["", "Every scored run:", "",
              "| arm | seed | step | stage steps | params | FID | KID x1000 | class acc. | commit |",
              "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (order.get(r["arm"], -1), r["seed"], r["step"])):
        if r.get("fid") is None:
            continue
        commit = (r.get("commit") or "?") + ("+" if r.get("dirty") else "")
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['step']} | {'+'.join(map(str, r['stage_steps']))} | {r['parameters']:,} "
            f"| {r['fid']:.1f} | {1000 * r['kid']:.2f} | {r['accuracy']:.1%} | {commit} |"
        )
    return "\n".join(lines) + "\n"


def summary_from_table(spec: StudySpec, text: str) -> tuple[list[dict], dict | None]:
    """The aggregated rows and the floor of a committed table (markdown_tables' first table), for the plot.

    Lets a plot be redrawn from the docs after a fresh machine has lost runs/ (FID only: what the plot uses).
    """
    title = text.lstrip().splitlines()[0] if text.strip() else ""
    if title != f"# {spec.name}":
        raise ValueError(f"not the table of {spec.name} (its first line is {title!r}, not '# {spec.name}')")
    arms = {arm.label: arm.name for arm in spec.arms}
    summary, real = [], None
    for line in text.splitlines():
        cells = [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11:
            continue
        label, fid = cells[0], cells[6].replace("*", "").split("±")
        if label.endswith("(floor)"):
            real = {"label": label.removesuffix("(floor)").strip(), "fid": float(fid[0])}
        elif label in arms:
            summary.append({"arm": arms[label], "label": label, "fraction": float(cells[1]),
                            "train_tflops": float(cells[4]), "seeds": int(cells[5]), "fid": float(fid[0]),
                            "fid_spread": float(fid[1]) if len(fid) > 1 else 0.0})
    if not summary:
        raise ValueError(f"no row of {spec.name}'s arms in the table (labels: {', '.join(arms)})")
    return summary, real


def plot(spec: StudySpec, summary: list[dict], real: dict | None, path: Path) -> None:
    """FID against training compute, one line per arm; `summary` as `aggregate` returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for arm in spec.arms:
        points = sorted((r for r in summary if r["arm"] == arm.name), key=lambda r: r["fraction"])
        if points:
            axes.errorbar([r["train_tflops"] for r in points], [r["fid"] for r in points],
                          yerr=[r.get("fid_spread", 0.0) for r in points], marker="o", capsize=3, label=arm.label)
    if real:
        axes.axhline(real["fid"], color="grey", linestyle="--", linewidth=1, label=f"{real['label']} (floor)")
    axes.set_xlabel("training compute (TFLOP, forward + backward)")
    axes.set_ylabel("FID (lower is better; log scale)")
    axes.set_yscale("log")  # one arm far behind (an untrained band: FID in the hundreds) hides no other
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title(f"{spec.name}: FID of {spec.eval.num_samples} samples vs training compute "
                   f"(mean ± half-range over seeds)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


# ---------------------------------------------------------------------------------------------------
# The study


def jobs(spec: StudySpec, plans: dict[tuple[str, int], ArmPlan]) -> Iterator[tuple[ArmPlan, float, int]]:
    """(plan, fraction, step) breadth first: every arm and seed reaches a point before any goes further."""
    for fraction in spec.eval_fractions:
        for seed in spec.seeds:
            for arm in spec.arms:
                plan = plans[(arm.name, seed)]
                yield plan, fraction, plan.budget.step_at_fraction(fraction)


def collect(spec: StudySpec, plans: dict, runs: Path) -> list[dict]:
    rows = []
    for plan, fraction, step in jobs(spec, plans):
        path = report_path(runs, plan, step)
        rows.append(row_from_report(plan, step, fraction, json.loads(path.read_text()) if path.is_file() else None))
    return rows


def write_results(spec: StudySpec, plans: dict, runs: Path, real: dict | None, plot_path: Path | None) -> str:
    rows = collect(spec, plans, runs)
    table = markdown_tables(spec, rows, real)
    write_json_report({"study": spec.name, "rows": rows, "real": real, **provenance()}, runs / "results.json")
    (runs / "table.md").write_text(f"# {spec.name}\n\n{spec.description.strip()}\n\n{table}")
    if plot_path is not None and any(r.get("fid") is not None for r in rows):
        plot(spec, aggregate(rows), real, plot_path)
    return table


def load_spec(path: Path) -> StudySpec:
    return load_yaml(StudySpec, path)


def selection_error(spec: StudySpec, arms: list[str] | None, seeds: list[int] | None) -> str | None:
    """What is wrong with --arms / --seeds for this spec (a selection outside it would run nothing), or None."""
    names = [arm.name for arm in spec.arms]
    unknown_arms = [a for a in arms or [] if a not in names]
    if unknown_arms:
        return f"--arms {' '.join(unknown_arms)}: not in {spec.name} (its arms: {', '.join(names)})"
    unknown_seeds = [s for s in seeds or [] if s not in spec.seeds]
    if unknown_seeds:
        return (f"--seeds {' '.join(map(str, unknown_seeds))}: not in {spec.name}'s seeds {spec.seeds} "
                "(add them to the spec's `seeds`)")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spec", type=Path, help="a study YAML (configs/study/*.yaml)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study", help="parent of the study's directory")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these training seeds")
    parser.add_argument("--plan", action="store_true", help="print parameters, FLOPs and steps per arm; run nothing")
    parser.add_argument("--report", action="store_true", help="rewrite the tables and plot from what exists")
    parser.add_argument("--classifier", type=Path, default=None, help="a saved Fashion-MNIST classifier")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training and evaluation)")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the plot (default RUNS/fid.png)")
    parser.add_argument("--replot", type=Path, default=None, metavar="TABLE.md",
                        help="only redraw the plot from a committed table (docs/study/NAME.md); run nothing")
    args = parser.parse_args()
    exit_on_sigterm()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    if error := selection_error(spec, args.arms, args.seeds):
        parser.error(error)
    if args.replot:
        if not args.replot.is_file():
            parser.error(f"--replot {args.replot}: no such file")
        try:
            summary, real = summary_from_table(spec, args.replot.read_text())
        except ValueError as error:
            parser.error(f"--replot {args.replot}: {error}")
        plot(spec, summary, real, args.plot or args.replot.with_name(f"{spec.name}_fid.png"))
        return
    runs = args.runs / spec.name
    plot_path = args.plot or runs / "fid.png"
    flops_cache: dict = {}
    plans = {(arm.name, seed): plan_arm(spec, arm, seed, flops_cache, runs) for arm in spec.arms for seed in spec.seeds}

    if args.plan:
        counts = [p.parameters for p in plans.values()]
        for arm in spec.arms:
            plan = plans[(arm.name, spec.seeds[0])]
            steps = [s.steps for s in plan.config.stages]
            points = [plan.budget.step_at_fraction(f) for f in spec.eval_fractions]
            gflops = [round(f / 1e9, 2) for f in plan.budget.stage_flops]
            print(f"{arm.name:>10}  {plan.parameters:>10,} params  GFLOP/step {gflops}  steps {steps}  "
                  f"{plan.budget.total_flops / 1e12:.1f} TFLOP  images {plan.budget.images_until(sum(steps)):,}  "
                  f"scored at {points}")
        print(f"parameter spread: {100 * (max(counts) / min(counts) - 1):.2f}%")
        return

    from matryoshka.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    evaluator = Evaluator(spec.eval, classifier_dir=args.classifier, progress=False)
    first = next(iter(plans.values())).config.mdm.model
    real = real_floor(spec, evaluator, runs, first.image_size, first.in_channels) if spec.real_floor else None
    if not args.report:
        for plan, fraction, step in jobs(spec, plans):
            if (args.arms and plan.arm.name not in args.arms) or (args.seeds and plan.seed not in args.seeds):
                continue
            if not plan.budget.full_model_at(step) or report_path(runs, plan, step).is_file():
                continue
            if not earlier_points_scored(spec, plan, step, runs):  # training on would skip one for good
                continue
            with run_lock(plan.run_dir(runs)) as held:
                if not held:
                    print(f"[{plan.arm.name}/seed{plan.seed}] held by another invocation: skipped", flush=True)
                    continue
                if report_path(runs, plan, step).is_file():  # scored while we waited
                    continue
                score_point(plan, step, fraction, runs, evaluator, args.threads)
            write_results(spec, plans, runs, real, plot_path)
    print(write_results(spec, plans, runs, real, plot_path))
    print(f"results in {runs}; plot {plot_path}")


if __name__ == "__main__":
    main()
