"""``deadlift bench`` runs every scenario from an installed checkout (a short run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # starts servers and worker processes: ~25 s
def test_bench_runs_every_scenario_and_reports_ratios() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "bench", "--json", "-n", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    rates = {r["name"]: r["events"] / r["seconds"] for r in report["results"] if r["seconds"]}
    assert {"bare loop", "deadlift 1 step", "deadlift 3 steps"} <= set(rates)
    assert all(rate > 0 for rate in rates.values())
    assert report["ratios"]["deadlift 1 step / bare loop"] > 0
