"""The product story end to end: `deadlift demo` must pass on a fresh checkout."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deadlift.demo import EXPECTED, run_demo, stripe
from tests.conftest import ROOT


async def test_demo_story_runs_and_checks_itself() -> None:
    assert await run_demo(verbose=False) is True
    sent = stripe.outbox()
    assert sorted(e["to"] for e in sent) == sorted(
        f"{c}@acme.example" for c, n in EXPECTED.items() for _ in range(n)
    )
    assert all("10%" in e["body"] for e in sent)


@pytest.mark.slow
def test_demo_command_exits_zero_and_prints_the_outcome() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deadlift.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "before_charge_action" in result.stdout and "aggregate_discounts" in result.stdout
