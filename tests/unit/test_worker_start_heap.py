"""A worker's start: no garbage collection while it builds its steps, and module
threads that get the GIL back quickly from a busy event loop.

At 1,000 workflows (3,000 steps) Python's collector walked the growing heap of the
start again and again (7 full collections of up to 350 ms with the event loop
stopped, 2 s of an 8 s start), and each module thread coming back from one of the
~8 libextism calls of a step's first event waited up to the 5 ms switch interval
for the busy event loop to let go of the GIL.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.aio.client import Client

from deadlift.bus.identity import GLOBAL_ACCOUNT, Identity
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime import worker as worker_module
from deadlift.runtime.context import step_signature
from deadlift.runtime.threads import SWITCH_INTERVAL_S, collector_paused
from deadlift.runtime.worker import Worker
from tests.unit.test_worker_reconcile import flow

FLOWS = 300


@dataclass
class Runner:
    """What a started step leaves behind: long-lived objects, some in cycles."""

    step: Step
    signature: Any
    stopped: bool = False
    state: list[Any] = field(default_factory=list)

    async def stop(self) -> None:
        self.stopped = True


class Registry:
    def __init__(self, workflows: list[Workflow]) -> None:
        self._workflows = workflows

    async def workflows(self) -> list[Workflow]:
        return self._workflows

    async def watch_workflows(
        self, stop: asyncio.Event | None = None
    ) -> AsyncIterator[tuple[str, Workflow | None]]:
        assert stop is not None
        await stop.wait()
        return
        yield  # an async generator that yields nothing


@pytest.fixture
def heap() -> Iterator[None]:
    """Leave the collector and the switch interval as the test found them."""
    enabled, interval = gc.isenabled(), sys.getswitchinterval()
    gc.enable()
    yield
    gc.unfreeze()
    sys.setswitchinterval(interval)
    (gc.enable if enabled else gc.disable)()


async def started_worker(monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> Worker:
    """A worker started on FLOWS workflows, with NATS and the steps' innards faked."""
    worker = Worker(Client(), advertise=False)

    async def whoami(nc: Client) -> Identity:
        return Identity(GLOBAL_ACCOUNT)

    async def open_registry(js: Any, **kwargs: Any) -> Registry:
        return Registry([flow(i) for i in range(FLOWS)])

    async def ensure_streams(workflows: Any) -> set[str]:
        return set(workflows)

    async def consumers_of(steps: Any) -> dict[Any, Any]:
        return {}

    async def start_step(workflow: Workflow, step: Step, existing: Any = None) -> list[Runner]:
        seen["collecting"] = seen.get("collecting", False) or gc.isenabled()
        seen.setdefault("before", seen.get("collections", 0))  # collections so far
        runner = Runner(step, step_signature(workflow, step))
        for _ in range(200):  # what a real step allocates: tasks, encoders, closures
            node: dict[str, Any] = {"runner": runner}
            node["self"] = node
            runner.state.append(node)
        await asyncio.sleep(0)
        seen["after"] = seen.get("collections", 0)
        return [runner]  # type: ignore[list-item]

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            seen["collections"] = seen.get("collections", 0) + 1

    monkeypatch.setattr(worker_module, "whoami", whoami)
    monkeypatch.setattr(worker_module.Registry, "open", open_registry)
    monkeypatch.setattr(worker.watchdog, "start", lambda loop, on_stuck: None)
    monkeypatch.setattr(worker, "_ensure_streams", ensure_streams)
    monkeypatch.setattr(worker, "_consumers_of", consumers_of)
    monkeypatch.setattr(worker, "_start_step", start_step)
    gc.callbacks.append(count)
    try:
        await worker.start()
    finally:
        gc.callbacks.remove(count)
    return worker


async def test_a_start_builds_its_steps_without_collecting_then_freezes_them(
    monkeypatch: pytest.MonkeyPatch, heap: None
) -> None:
    seen: dict[str, Any] = {}
    gc.collect()
    gc.set_threshold(*gc.get_threshold())  # the usual thresholds: 700 allocations
    worker = await started_worker(monkeypatch, seen)
    try:
        assert len(worker.steps) == 2 * FLOWS
        assert seen.get("collecting") is False, "the collector ran while steps started"
        assert seen["before"] == seen["after"], "collections while steps started"
        assert gc.isenabled(), "the collector must resume after the start"
        # What the start made is frozen: later collections do not walk it again.
        assert gc.get_freeze_count() > 2 * FLOWS * 200
        assert sys.getswitchinterval() <= SWITCH_INTERVAL_S

        # A reload that stops steps lets the collector reclaim what they leave.
        await worker._reconcile_many({flow(0).key: None})
        assert gc.get_freeze_count() == 0
    finally:
        await worker.shutdown()


async def test_a_replayed_unchanged_workflow_keeps_the_heap_frozen(
    monkeypatch: pytest.MonkeyPatch, heap: None
) -> None:
    """The registry watch replays every workflow after the start: nothing stops."""
    worker = await started_worker(monkeypatch, {})
    try:
        frozen = gc.get_freeze_count()
        await worker._reconcile_many({flow(1).key: flow(1)})
        assert gc.get_freeze_count() >= frozen
    finally:
        await worker.shutdown()


async def test_a_shutdown_stops_its_steps_without_collecting(
    monkeypatch: pytest.MonkeyPatch, heap: None
) -> None:
    """10,000 workflows: full collections while 30,000 steps stopped ran SIGTERM past
    its 25 s (exit 70); paused, the stop took 3.5 s at 6,000 instead of 9.7 s."""
    worker = await started_worker(monkeypatch, {})
    gc.unfreeze()
    collecting: list[bool] = []

    async def stop(self: Runner) -> None:
        collecting.append(gc.isenabled())

    monkeypatch.setattr(Runner, "stop", stop)
    await worker.shutdown()
    assert collecting == [False] * (2 * FLOWS)
    assert gc.isenabled(), "the collector must resume after the stop"
    assert gc.get_freeze_count() == 0, "what a stop leaves is garbage: never frozen"


async def test_concurrent_starts_resume_the_collector_after_the_last(heap: None) -> None:
    """A fleet starts many orgs' workers in one process at once."""
    first, second = asyncio.Event(), asyncio.Event()

    async def start(began: asyncio.Event, end: asyncio.Event) -> None:
        with collector_paused():
            began.set()
            await end.wait()

    done_a, done_b = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(start(first, done_a))
    b = asyncio.create_task(start(second, done_b))
    await first.wait()
    await second.wait()
    assert not gc.isenabled()
    done_a.set()
    await a
    assert not gc.isenabled(), "one start ended, the other still runs"
    done_b.set()
    await b
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled(heap: None) -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()
