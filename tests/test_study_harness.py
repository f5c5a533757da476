"""benchmarks/study.py: budgets at equal FLOPs, breadth-first jobs that resume, tables with spreads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def study():
    return load_benchmark("study")


def test_every_shipped_study_plans_equal_compute_at_equal_parameters(study):
    """Each arm's last stage is sized so that every arm spends the budget (to one step's FLOPs), and the
    arms of a study have parameter counts within 2% (the issue's bar)."""
    specs = [p for p in sorted((ROOT / "configs" / "study").glob("*.yaml")) if "budget_tflops:" in p.read_text()]
    assert len(specs) >= 2
    for path in specs:  # the study specs (the folder also holds their arms' training configs)
        spec = study.load_spec(path)
        cache: dict = {}
        plans = [study.plan_arm(spec, arm, spec.seeds[0], cache) for arm in spec.arms]
        for plan in plans:
            assert abs(plan.budget.total_flops - spec.budget_tflops * 1e12) <= plan.budget.stage_flops[-1] / 2 + 1
        counts = [p.parameters for p in plans]
        assert max(counts) / min(counts) - 1 < 0.02, (path.name, counts)


def test_budget_points_and_progressive_stages(study):
    from matryoshka.training.testing import tiny_config

    config = tiny_config(["stages=[{levels: 1, steps: 4}, {levels: 2, steps: 6}]"])
    budget = study.Budget(config, [1.0, 3.0])
    assert budget.total_flops == 4 + 18
    assert budget.flops_until(5) == 4 + 3
    assert budget.step_at_fraction(0.5) == 7  # 4 + 3 * 3 = 13 >= 11
    assert not budget.full_model_at(4) and budget.full_model_at(5)
    assert study.budget_overrides(config, [1.0, 3.0], 40.0) == ["stages.1.steps=12"]  # (40 - 4) / 3
    with pytest.raises(ValueError, match="do not cover the earlier stages"):
        study.budget_overrides(config, [1.0, 3.0], 3.0)


def test_an_automatic_arm_is_sized_by_the_trainer_and_read_back_from_its_run(study, tmp_path: Path):
    """A stage that may end on its plateau leaves the last stage's length to the trainer's budget; the plan
    reads where it ended from the run's newest checkpoint, and scores only at the full budget."""
    from matryoshka.training.testing import tiny_config

    automatic = "stages=[{levels: 1, steps: 4, end_on_plateau: {every: 1}}, {levels: 2, steps: 6}]"
    config = tiny_config([automatic])
    assert study.budget_overrides(config, [1.0, 3.0], 40.0) == ["budget_tflops=4e-11", "stages.1.steps=13"]
    config = tiny_config([automatic, "budget_tflops=4e-11", "stages.1.steps=13"])
    budget = study.Budget(config, [1.0, 3.0])
    assert budget.bounds == [0, 4, 16]  # 4 + 36 / 3
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"stage_ends": {"0": 1}}))
    budget.ended = study.stage_ends(tmp_path / "run")
    assert budget.ended == {0: 1} and budget.bounds == [0, 1, 14]  # 1 + 39 / 3: the last stage took the rest
    assert budget.stage_steps == [1, 13]  # what the tables say it ran (not the configured maximum)
    assert budget.total_flops == pytest.approx(40.0, abs=1.5)
    spec = study.load_spec(ROOT / "configs" / "study" / "diagnose32.yaml")
    arm = next(a for a in spec.arms if any("end_on_plateau" in s for s in a.set))
    plan = study.plan_arm(spec, arm, 0, {})
    assert plan.automatic and plan.config.budget_tflops == spec.budget_tflops
    spec.eval_fractions = [0.5, 1.0]
    with pytest.raises(ValueError, match="eval_fractions"):
        study.plan_arm(spec, arm, 0, {})


def test_jobs_go_breadth_first_and_a_rerun_continues(study, tmp_path: Path):
    spec = study.StudySpec(
        name="t", description="", budget_tflops=1e-3, eval_fractions=[0.5, 1.0], seeds=[0, 1],
        arms=[study.ArmSpec("x", "x", "configs/fashion_tiny_32x16.yaml"),
              study.ArmSpec("y", "y", "configs/fashion_tiny_32x16.yaml")],
    )
    spec.validate()
    from matryoshka.training.testing import tiny_config

    config = tiny_config(["stages=[{levels: 2, steps: 4}]"])
    plans = {(a.name, s): study.ArmPlan(a, s, [], config, study.Budget(config, [1.0]), 10)
             for a in spec.arms for s in spec.seeds}
    order = [(p.arm.name, p.seed, step) for p, _, step in study.jobs(spec, plans)]
    assert order == [("x", 0, 2), ("y", 0, 2), ("x", 1, 2), ("y", 1, 2), ("x", 0, 4), ("y", 0, 4), ("x", 1, 4),
                     ("y", 1, 4)]
    # A point is not trained past while an earlier one has no report (it would be lost for good).
    plan = plans[("x", 0)]
    assert not study.earlier_points_scored(spec, plan, 4, tmp_path)
    report = study.report_path(tmp_path, plan, 2)
    report.parent.mkdir(parents=True)
    report.write_text("{}")
    assert study.earlier_points_scored(spec, plan, 4, tmp_path)
    with study.run_lock(plan.run_dir(tmp_path)) as held, study.run_lock(plan.run_dir(tmp_path)) as again:
        assert held and not again


def test_tables_give_mean_and_half_range_over_seeds(study):
    rows = []
    for seed, fid in ((0, 40.0), (1, 44.0)):
        rows.append({"arm": "a", "label": "(a)", "seed": seed, "fraction": 1.0, "step": 10, "parameters": 5,
                     "images_seen": 320, "train_tflops": 1.0, "stage_steps": [10], "fid": fid, "kid": 0.01,
                     "kid_std": 0.001, "precision": 0.5, "recall": 0.4, "accuracy": 0.9, "commit": "abc"})
    summary = study.aggregate(rows)
    assert summary[0]["fid"] == 42.0 and summary[0]["fid_spread"] == 2.0 and summary[0]["seeds"] == 2
    spec = study.StudySpec(name="t", description="", budget_tflops=1.0, eval_fractions=[1.0], seeds=[0, 1],
                           arms=[study.ArmSpec("a", "(a)", "x.yaml")])
    table = study.markdown_tables(spec, rows, {"label": "real", "fid": 18.0, "kid": 0.0, "precision": 0.8,
                                                "recall": 0.8})
    assert "| 42.0 ± 2.0 |" in table and "| real (floor) |" in table and "| abc |" in table
    json.dumps(summary)  # results.json holds it


def test_a_committed_table_gives_back_the_plotted_summary(study):
    def row(arm, label, seed, fraction, fid):
        return {"arm": arm, "label": label, "seed": seed, "fraction": fraction, "step": 10, "parameters": 5,
                "images_seen": 320, "train_tflops": 2.0 * fraction, "stage_steps": [10], "fid": fid,
                "kid": 0.01, "kid_std": 0.001, "precision": 0.5, "recall": 0.4, "accuracy": 0.9, "commit": "abc"}

    rows = [row("a", "(a) plain", 0, 1.0, 40.0), row("a", "(a) plain", 1, 1.0, 44.0),
            row("a", "(a) plain", 0, 0.5, 61.5), row("c", "(c) nested", 0, 1.0, 52.25)]
    spec = study.StudySpec(name="t", description="two arms", budget_tflops=2.0, eval_fractions=[0.5, 1.0],
                           seeds=[0, 1], arms=[study.ArmSpec("a", "(a) plain", "x.yaml"),
                                               study.ArmSpec("c", "(c) nested", "y.yaml")])
    real = {"label": "1000 real train images", "fid": 18.1, "kid": 0.0, "precision": 0.8, "recall": 0.8}
    text = f"# t\n\ntwo arms\n\n{study.markdown_tables(spec, rows, real)}"
    summary, floor = study.summary_from_table(spec, text)
    got = {(r["arm"], r["fraction"]): (r["fid"], r["fid_spread"], r["seeds"], r["train_tflops"]) for r in summary}
    assert got == {("a", 0.5): (61.5, 0.0, 1, 1.0), ("a", 1.0): (42.0, 2.0, 2, 2.0),
                   ("c", 1.0): (52.2, 0.0, 1, 2.0)}  # the table's one decimal
    assert floor == {"label": "1000 real train images", "fid": 18.1}
    with pytest.raises(ValueError, match="not the table of t"):
        study.summary_from_table(spec, text.replace("# t\n", "# other\n", 1))


def test_a_selection_outside_the_spec_is_refused_not_silently_empty(study):
    spec = study.load_spec(ROOT / "configs/study/diagnose32.yaml")
    assert study.selection_error(spec, ["a", "c"], spec.seeds) is None
    assert "--arms nope: not in diagnose32" in study.selection_error(spec, ["a", "nope"], None)
    missing = max(spec.seeds) + 1
    assert f"--seeds {missing}: not in diagnose32's seeds" in study.selection_error(spec, None, [missing])


def test_stopping_the_study_stops_its_training_child(tmp_path: Path):
    """SIGTERM to the study (a queue being stopped) must not leave the training process it started running
    on: that orphan would go on writing a run whose lock has been released."""
    child_pid = tmp_path / "child.pid"
    child = tmp_path / "child.py"  # stands in for `matryoshka train`
    child.write_text(f"import os, time\nopen({str(child_pid)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    script = tmp_path / "harness.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from helpers import load_benchmark\n"
        "study = load_benchmark('study')\n"
        "study.exit_on_sigterm()\n"
        f"study.run_child([sys.executable, {str(child)!r}], dict(os.environ))\n"
    )
    harness = subprocess.Popen([sys.executable, str(script)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (child_pid.exists() and child_pid.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(child_pid.read_text())
    harness.send_signal(signal.SIGTERM)
    assert harness.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the training child outlived the stopped study"
