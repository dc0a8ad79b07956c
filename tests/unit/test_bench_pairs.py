"""``deadlift bench``'s interleaved pairs: their order, median ratio and spread."""

from __future__ import annotations

import pytest

from deadlift.model.workflow import parse_workflow
from deadlift.ops import benchmark
from deadlift.ops.bench_gate import Gate
from deadlift.ops.bench_pairs import Plan, Run, compare, schedule, summary
from deadlift.ops.bench_support import Result


def runs(name: str, *rates: float) -> list[Result]:
    return [Result(name, 1000, 1000 / rate) for rate in rates]


def test_pairs_alternate_a_b_a_b() -> None:
    assert schedule(["bare", "deadlift"], 3) == [
        (1, "bare"),
        (1, "deadlift"),
        (2, "bare"),
        (2, "deadlift"),
        (3, "bare"),
        (3, "deadlift"),
    ]
    assert schedule(["a", "b", "c"], 2) == [
        (1, "a"),
        (1, "b"),
        (1, "c"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
    ]


def test_median_ratio_and_spread_come_from_each_pair() -> None:
    # Pair by pair: 2.0, 3.0, 1.5. Ratios of the medians (20/10 = 2.0) would
    # hide that the third pair ran on a slow spell of one side.
    pairs = compare(runs("deadlift", 20, 30, 30), runs("bare", 10, 10, 20))
    assert pairs.ratios == pytest.approx((2.0, 3.0, 1.5))
    assert pairs.median_ratio == pytest.approx(2.0)
    assert pairs.spread == pytest.approx((1.5, 3.0))
    assert pairs.describe() == "2.00x [1.50-3.00]"
    report = pairs.to_json()
    assert report["pairs"] == 3
    assert report["median_rates"] == {"deadlift": pytest.approx(30), "bare": pytest.approx(10)}


def test_an_even_number_of_pairs_takes_the_middle_two() -> None:
    pairs = compare(runs("b", 20, 40, 10, 30), runs("a", 10, 10, 10, 10))
    assert pairs.median_ratio == pytest.approx(2.5)
    assert pairs.spread == pytest.approx((1.0, 4.0))


def test_pairs_need_the_same_rounds() -> None:
    with pytest.raises(ValueError):
        compare(runs("b", 1, 2), runs("a", 1))


def test_summary_gives_the_median_run_and_every_run() -> None:
    line = summary(runs("bare", 100, 300, 200))
    assert line.rate == pytest.approx(200)
    assert line.runs == pytest.approx([100, 300, 200])
    assert line.events == 1000


async def test_plan_runs_the_sides_interleaved_and_numbers_them() -> None:
    order: list[str] = []

    def side(name: str, rate: float) -> Run:
        async def run() -> Result:
            order.append(name)
            return Result(name, 100, 100 / rate)

        return run

    told: list[tuple[int, int, str, bool]] = []
    plan = Plan(4, lambda n, of, label, r: told.append((n, of, label, r is None)))
    results = await plan.rounds({"bare": side("bare", 10), "deadlift": side("deadlift", 25)}, 2)
    assert order == ["bare", "deadlift", "bare", "deadlift"]
    assert [(n, label) for n, _, label, started in told if started] == [
        (1, "bare (round 1/2)"),
        (2, "deadlift (round 1/2)"),
        (3, "bare (round 2/2)"),
        (4, "deadlift (round 2/2)"),
    ]
    assert compare(results["deadlift"], results["bare"]).median_ratio == pytest.approx(2.5)


def test_a_chain_is_timed_from_its_trigger_held_and_pulled() -> None:
    """The backlog waits at the trigger; the other steps' consumers wait cold (no pulls)."""
    gate = Gate.of(parse_workflow(benchmark._chain(3)), benchmark.OUTPUT)
    assert gate.consumer == "bench--bench--s0--trigger"
    assert gate.pulls == ((gate.stream, "bench--bench--s0--trigger"),)
    assert gate.output == "bench.out"


def test_the_worker_command_is_the_cli() -> None:
    from deadlift.ops.bench_support import worker_command

    assert worker_command()[-1] == "worker"
    assert worker_command(1)[-3:] == ["worker", "--processes", "1"]
