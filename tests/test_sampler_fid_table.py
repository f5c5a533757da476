"""benchmarks/sampler_fid.py: per-setting means over sampling seeds and the documented fast setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def sampler_fid():
    return load_benchmark("sampler_fid")


def report(sampler, steps, seed, fid, nfe, interval="none"):
    return {"sampler": sampler, "steps": steps, "seed": seed, "interval": interval, "nfe_per_sample": nfe,
            "fid": fid, "kid": {"mean": 0.01}, "conditioning": {"accuracy": 0.9}}


def test_the_fast_setting_is_the_cheapest_within_ddim50s_seed_spread(sampler_fid, tmp_path: Path):
    reports = [report("ddim", 50, 0, 40.0, 100), report("ddim", 50, 1, 42.0, 100),  # 41.0 ± 1.0
               report("ddim", 8, 0, 45.0, 16), report("dpmpp_2m", 12, 0, 41.9, 24),
               report("dpmpp_2m", 20, 0, 40.5, 40), report("ddim", 12, 0, 41.5, 14, interval="sigma 0.3..5")]
    for i, r in enumerate(reports):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "report.json").write_text(json.dumps(r))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "report.json").write_text(json.dumps({"fid": 1.0}))  # not a sampler_fid report
    summary = sampler_fid.summarize(sampler_fid.report_rows(tmp_path))
    ddim50 = next(s for s in summary if (s["sampler"], s["steps"]) == ("ddim", 50))
    assert (ddim50["fid"], ddim50["fid_spread"], ddim50["seeds"]) == (41.0, 1.0, 2)
    fast = sampler_fid.fast_setting(summary)
    assert (fast["sampler"], fast["steps"], fast["interval"]) == ("ddim", 12, "sigma 0.3..5")  # NFE 14 <= 42.0
    table = sampler_fid.markdown(summary)
    assert "| 41.0 ± 1.0 |" in table and "ddim, 12 steps, guidance sigma 0.3..5" in table
    assert sampler_fid.fast_setting([s for s in summary if s["steps"] != 50]) is None  # no reference scored
