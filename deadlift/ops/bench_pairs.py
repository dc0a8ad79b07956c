"""Interleaved runs: how ``deadlift bench`` compares scenarios on a noisy machine.

Scenarios compared run in rounds, each scenario once per round, in the same
order: bare loop, Deadlift, bare loop, Deadlift… (A B A B …). A slow spell of a
shared machine then falls on both sides of a pair, and each pair gives its own
ratio; the report gives the median ratio over the pairs and their spread
(lowest and highest), with each side's median events/s.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deadlift.ops.bench_support import Result

Run = Callable[[], Awaitable[Result]]
Progress = Callable[[int, int, str, Result | None], None]
"""Told ``(number, of, label, None)`` as a run starts and ``(…, result)`` as it ends."""


def schedule(sides: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """The order of the runs, ``(round, side)``: every side once per round, A B A B …"""
    return [(number, side) for number in range(1, rounds + 1) for side in sides]


@dataclass(frozen=True, slots=True)
class Comparison:
    """Pairs of runs of two scenarios: ``subject`` against ``baseline``, round by round."""

    subject: str
    baseline: str
    subject_rates: tuple[float, ...]
    baseline_rates: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        """Each pair's ratio, subject / baseline events/s."""
        return tuple(
            s / b if b else float("nan")
            for s, b in zip(self.subject_rates, self.baseline_rates, strict=True)
        )

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """The lowest and the highest ratio of a pair."""
        return min(self.ratios), max(self.ratios)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "baseline": self.baseline,
            "pairs": len(self.ratios),
            "ratios": list(self.ratios),
            "median_ratio": self.median_ratio,
            "spread": list(self.spread),
            "median_rates": {
                self.subject: statistics.median(self.subject_rates),
                self.baseline: statistics.median(self.baseline_rates),
            },
        }

    def describe(self) -> str:
        """``2.31x [2.10-2.45]``: the median ratio and the spread."""
        low, high = self.spread
        return f"{self.median_ratio:.2f}x [{low:.2f}-{high:.2f}]"


def compare(subject: Sequence[Result], baseline: Sequence[Result]) -> Comparison:
    """The pairs of two scenarios' runs of the same rounds."""
    if len(subject) != len(baseline) or not subject:
        raise ValueError("compare runs of the same rounds, at least one")
    return Comparison(
        subject[0].name,
        baseline[0].name,
        tuple(r.rate for r in subject),
        tuple(r.rate for r in baseline),
    )


def summary(runs: Sequence[Result]) -> Result:
    """One line for a scenario run several times: its median events/s, and every run's."""
    rates = [r.rate for r in runs]
    median = statistics.median(rates)
    first = runs[0]
    return Result(
        first.name,
        first.events,
        first.events / median if median else 0.0,
        extra=dict(first.extra),
        runs=rates,
    )


class Plan:
    """Runs one after the other, numbered for progress: ``total`` of them in all."""

    def __init__(self, total: int, progress: Progress | None = None) -> None:
        self.total = total
        self.progress = progress
        self.done = 0

    async def once(self, label: str, run: Run) -> Result:
        """One run, told to ``progress`` as it starts and ends."""
        number = self.done + 1
        if self.progress is not None:
            self.progress(number, self.total, label, None)
        result = await run()
        self.done = number
        if self.progress is not None:
            self.progress(number, self.total, label, result)
        return result

    async def rounds(self, sides: Mapping[str, Run], rounds: int) -> dict[str, list[Result]]:
        """Every side once per round, in order (:func:`schedule`); each side's runs."""
        runs: dict[str, list[Result]] = {side: [] for side in sides}
        for number, side in schedule(list(sides), rounds):
            label = f"{side} (round {number}/{rounds})" if rounds > 1 else side
            runs[side].append(await self.once(label, sides[side]))
        return runs
