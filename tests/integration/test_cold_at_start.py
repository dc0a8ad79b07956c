"""Steps going cold while a worker starts miss no event, and serve each once.

A worker starting many steps lists their consumers once; a step whose consumer
showed nothing waiting then goes cold at once, without the batch fetch it would
start with. An event stored after that listing and before the step's doorbell
was armed rings nothing: only the step's check, asked after arming, finds it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from typing import Any

from nats.aio.client import Client
from nats.js.api import ConsumerInfo

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.workflow import Step, Workflow, parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.runtime.worker import LIST_CONSUMERS_FROM, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import eventually, module_path, stored

FLOWS = LIST_CONSUMERS_FROM // 2  # two steps each: enough for the start's listing


def flow(i: int) -> str:
    return f"""
name: w{i}
org: acme
trigger: w{i}.in
steps:
  - {{name: a, module: add_ten, function: add_ten, next: [b]}}
  - {{name: b, module: add_ten, function: add_ten, publish: [w{i}.out]}}
"""


async def ready(nc: Client, registry: Registry, settings: Settings) -> None:
    await registry.push_module(module_path("add_ten").read_bytes(), name="add_ten")
    flows = [(parse_workflow(flow(i)), f"w{i}.yaml") for i in range(FLOWS)]
    await apply_workflows(nc.jetstream(), registry, settings, flows)


async def send(nc: Client, flow: int, value: int) -> None:
    headers, body = events.encode(events.new_event({"value": value}, source="t", type="t"))
    await nc.jetstream().publish(f"w{flow}.in", body, headers=headers)


async def outputs(nc: Client) -> dict[int, list[int]]:
    found = {i: [e.data["value"] for e in await stored(nc, f"w{i}.out")] for i in range(FLOWS)}
    return {i: values for i, values in found.items() if values}


async def test_events_stored_after_the_start_listed_the_consumers_are_served_once(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    await ready(nc, registry, settings)
    # Half the triggers' consumers made (as by an earlier worker), half not made yet:
    # a step finds its events either way.
    for workflow in await registry.workflows():
        if int(workflow.name[1:]) % 2 == 0:
            await bus.ensure_triggers(nc.jetstream(), settings, workflow)
    worker_nc = await bus.connect(settings, name="deadlift-worker")
    worker = Worker(worker_nc, settings=settings, advertise=False)
    listed = worker._consumers_of

    async def listing_then_events(
        steps: Iterable[tuple[Workflow, Step]],
    ) -> Mapping[tuple[str, str], ConsumerInfo] | None:
        found = await listed(steps)
        assert found is not None and len(found) == FLOWS // 2, "the start listed those made"
        assert not any(i.num_pending for i in found.values())
        for i in range(FLOWS):  # stored before any step started: no doorbell rings
            await send(nc, i, i)
        return found

    worker._consumers_of = listing_then_events  # type: ignore[method-assign]
    try:
        async with worker:
            await eventually(
                lambda: _served(nc, FLOWS), timeout=15.0, message="every workflow served"
            )
            await asyncio.sleep(1.5)  # a duplicate would show by now
            assert await outputs(nc) == {i: [i + 20] for i in range(FLOWS)}
    finally:
        await worker_nc.close()


async def test_events_published_while_steps_start_and_go_cold_are_served_once(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    await ready(nc, registry, settings)
    worker_nc = await bus.connect(settings, name="deadlift-worker")
    sent: dict[int, list[int]] = {}
    done = asyncio.Event()

    async def publish_meanwhile() -> None:
        value = 0
        while not done.is_set():
            flow = random.randrange(FLOWS)
            value += 1
            await send(nc, flow, value)
            sent.setdefault(flow, []).append(value + 20)
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish_meanwhile())
    try:
        async with Worker(worker_nc, settings=settings, advertise=False):
            await asyncio.sleep(1.5)  # past the steps' settle checks
            done.set()
            await publisher
            total = sum(len(v) for v in sent.values())
            await eventually(
                lambda: _served(nc, len(sent), total), timeout=15.0, message="all served"
            )
            await asyncio.sleep(1.0)
            assert {i: sorted(v) for i, v in (await outputs(nc)).items()} == {
                i: sorted(v) for i, v in sent.items()
            }
    finally:
        done.set()
        await publisher
        await worker_nc.close()


async def _served(nc: Client, flows: int, events_: int | None = None) -> Any:
    found = await outputs(nc)
    return len(found) >= flows and sum(len(v) for v in found.values()) >= (events_ or flows)
