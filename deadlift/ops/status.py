"""What every step is doing now: backlog, in flight, redeliveries, rate, dead letters, workers.

Read from consumer and stream state only; the workers come from
:mod:`deadlift.ops.discovery`. This module prints nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.model import topology
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow
from deadlift.ops.discovery import DISCOVERY_TIMEOUT_S, WorkerInfo, discover_workers
from deadlift.wire import events

StepKey = tuple[str, str, str]  # org, workflow, step


@dataclass(frozen=True, slots=True)
class Counts:
    """One step's consumer state, summed over its consumers."""

    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    waiting: int = 0
    acked: int = 0  # ack floor (consumer sequence): how many deliveries are done
    consumers: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True, slots=True)
class StepStatus:
    """What one step is doing now."""

    org: str
    workflow: str
    step: str
    pending: int
    ack_pending: int
    redelivered: int
    rate: float | None  # events/s acked since the previous sample; None on the first
    dead_letters: int
    workers: int
    waiting: int
    consumers: int

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Every step of every workflow, at one moment."""

    time: str
    interval_s: float | None
    workers: int
    workers_source: str  # "describe" (workers answered) or "num_waiting" (fallback)
    steps: list[StepStatus]

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "time": self.time,
            "interval_s": self.interval_s,
            "workers": self.workers,
            "workers_source": self.workers_source,
            "steps": [s.to_json() for s in self.steps],
        }


def step_consumers(workflow: Workflow) -> dict[StepKey, list[bus.StepInput]]:
    """The consumers of every step: its input, and the triggers for entry steps."""
    return {
        (workflow.org, workflow.name, step.name): bus.step_inputs(workflow, step)
        for step in workflow.steps
    }


async def consumer_counts(js: JetStreamContext, wanted: bus.StepInput) -> Counts:
    """One consumer's state: zero if it does not exist, but for a trigger's not made yet
    (no worker came since events were sent) the events waiting for it."""
    try:
        info = await js.consumer_info(wanted.stream, wanted.consumer)
    except nats.js.errors.NotFoundError:
        if wanted.start is None:
            return Counts()
        waiting = await bus.count_from(js, wanted.stream, wanted.filters, wanted.start)
        return Counts(pending=waiting)
    return Counts(
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        waiting=info.num_waiting or 0,
        acked=info.ack_floor.consumer_seq if info.ack_floor else 0,
        consumers=1,
    )


async def step_counts(js: JetStreamContext, workflows: Sequence[Workflow]) -> dict[StepKey, Counts]:
    """Consumer state per step, summed over the step's consumers."""
    wanted = {k: v for w in workflows for k, v in step_consumers(w).items()}
    pairs = [(key, i) for key, inputs in wanted.items() for i in inputs]
    results = await asyncio.gather(*(consumer_counts(js, i) for _, i in pairs))
    totals = dict.fromkeys(wanted, Counts())
    for (key, _), counts in zip(pairs, results, strict=True):
        totals[key] = totals[key] + counts
    return totals


async def dead_letter_counts(js: JetStreamContext) -> dict[StepKey, int]:
    """How many dead letters each step has (from the DLQ stream's per-subject counts)."""
    try:
        info = await js.stream_info(Stream.DLQ, subjects_filter=topology.dlq_subject("*", "*", "*"))
    except nats.js.errors.NotFoundError:
        return {}
    counts: dict[StepKey, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        step = dlq.step_of(subject)
        if step is not None:
            counts[step] = count
    return counts


def workers_per_step(workers: Sequence[WorkerInfo]) -> Counter[str]:
    """``org.workflow.step`` → how many of ``workers`` run it."""
    return Counter(step for w in workers for step in set(w.steps))


def rate(previous: Counts | None, current: Counts, seconds: float) -> float | None:
    """Events per second acked between two samples (None without a previous one)."""
    if previous is None or seconds <= 0:
        return None
    return max(current.acked - previous.acked, 0) / seconds


@dataclass(frozen=True, slots=True)
class Sample:
    """Consumer state of every step at one moment (monotonic clock)."""

    at: float
    counts: dict[StepKey, Counts]


class StatusMonitor:
    """Samples every step's state; each report's rate is relative to the previous sample.

    Args:
        js: the JetStream context of the account to watch.
        registry: where the workflows come from (read at every sample: new ones appear).
        workflow: only this workflow (``ORG.NAME`` or ``NAME``).
    """

    def __init__(self, js: JetStreamContext, registry: Registry, workflow: str | None = None):
        self.js = js
        self.registry = registry
        self.workflow = workflow
        self.previous: Sample | None = None

    async def workflows(self) -> list[Workflow]:
        """The workflows to show (raises NotFoundError for an unknown ``workflow``)."""
        if self.workflow:
            return [await self.registry.workflow(self.workflow)]
        return await self.registry.workflows()

    async def sample(self) -> Sample:
        """Read every step's consumers now (and remember it for the next rate)."""
        workflows = await self.workflows()
        loop = asyncio.get_running_loop()
        return Sample(at=loop.time(), counts=await step_counts(self.js, workflows))

    async def report(self, workers: Sequence[WorkerInfo]) -> StatusReport:
        """Sample now and build a report, with rates since the previous sample."""
        previous = self.previous
        current = await self.sample()
        dead = await dead_letter_counts(self.js)
        self.previous = current
        per_step = workers_per_step(workers)
        interval = current.at - previous.at if previous else None
        steps = []
        for key, counts in current.counts.items():
            before = previous.counts.get(key) if previous else None
            step_workers = per_step[".".join(key)] if workers else _waiting_workers(counts)
            steps.append(
                StepStatus(
                    org=key[0],
                    workflow=key[1],
                    step=key[2],
                    pending=counts.pending,
                    ack_pending=counts.ack_pending,
                    redelivered=counts.redelivered,
                    rate=rate(before, counts, interval or 0.0),
                    dead_letters=dead.get(key, 0),
                    workers=step_workers,
                    waiting=counts.waiting,
                    consumers=counts.consumers,
                )
            )
        return StatusReport(
            time=events.now_rfc3339(),
            interval_s=round(interval, 3) if interval is not None else None,
            workers=len(workers),
            workers_source="describe" if workers else "num_waiting",
            steps=steps,
        )


def _waiting_workers(counts: Counts) -> int:
    """Without describe answers: idle workers leave a pull request waiting per consumer."""
    return counts.waiting // max(counts.consumers, 1)


async def status_once(
    nc: Client,
    registry: Registry,
    *,
    interval: float = 1.0,
    workflow: str | None = None,
    discovery_timeout: float = DISCOVERY_TIMEOUT_S,
) -> StatusReport:
    """Two samples ``interval`` apart (for the rates), workers discovered meanwhile."""
    monitor = StatusMonitor(nc.jetstream(), registry, workflow)
    discovery = asyncio.create_task(discover_workers(nc, timeout=discovery_timeout))
    try:
        monitor.previous = await monitor.sample()
        await asyncio.sleep(interval)
        workers = await discovery
    finally:
        discovery.cancel()
    return await monitor.report(workers)


async def status_reports(
    nc: Client,
    registry: Registry,
    stop: asyncio.Event,
    *,
    interval: float = 1.0,
    workflow: str | None = None,
) -> AsyncIterator[StatusReport]:
    """A report every ``interval`` seconds until ``stop`` is set (the first has no rates)."""
    monitor = StatusMonitor(nc.jetstream(), registry, workflow)
    timeout = min(DISCOVERY_TIMEOUT_S, interval / 2)
    while not stop.is_set():
        workers = await discover_workers(nc, timeout=timeout)
        yield await monitor.report(workers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
