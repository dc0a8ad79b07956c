"""``deadlift bench`` runs every scenario from an installed checkout (a short run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # starts servers and worker processes: ~50 s
@pytest.mark.timeout(360)
def test_bench_runs_every_scenario_and_reports_ratios() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "bench", "--json", "-n", "300", "--pairs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    rates = {r["name"]: r["events"] / r["seconds"] for r in report["results"] if r["seconds"]}
    assert {
        "bare loop",
        "deadlift worker",
        "deadlift worker --processes 1",
        "2 x deadlift worker --processes 1",
        "deadlift worker, 3 steps",
    } <= set(rates)
    assert all(rate > 0 for rate in rates.values())
    pairs = report["comparisons"]["deadlift worker / bare loop"]
    assert pairs["pairs"] == report["pairs"] == 1
    assert pairs["spread"][0] <= pairs["median_ratio"] <= pairs["spread"][1]
    assert report["ratios"]["deadlift worker / bare loop"] == pairs["median_ratio"] > 0
    assert set(report["targets"]) == set(report["measured"])
    guest = next(r for r in report["results"] if r["name"].startswith("1 step, guest"))
    assert guest["extra"]["run_records"] == 300  # the guest path was taken, every call
