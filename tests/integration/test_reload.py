"""Hot reload: workers follow the registry without a restart, losing and repeating nothing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from nats.aio.client import Client

from deadlift.bus.registry import Registry
from deadlift.ops.control import push_module_file, remove_workflow
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from tests.conftest import eventually, module_path, publish, stored

ADDER = """
name: adder
org: acme
trigger: adder.in
steps:
  - {name: add, module: adder, function: _main, publish: [adder.out]}
"""


async def test_new_workflow_starts_without_a_restart(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    async with Worker(nc, settings=settings) as worker:
        assert worker.steps == []
        started = time.monotonic()
        await apply(ADDER.replace("module: adder", "module: add_ten"))
        await eventually(lambda: worker.steps == ["acme.adder.add"], message="step started")
        await publish(nc, "adder.in", {"value": 1})
        await worker.drain()
        took = time.monotonic() - started
    out = await stored(nc, "adder.out")
    assert out[0].data == {"value": 11}
    assert took < 5  # typically ~0.1 s; see the README for the measured figure


async def test_module_version_switch_under_load_loses_and_repeats_nothing(
    nc: Client, settings: Settings, registry: Registry, apply: Any
) -> None:
    # adder@1 adds ten; adder@2 (a fix, say) passes the value through.
    await push_module_file(registry, module_path("add_ten"), name="adder", version="1")
    await apply(ADDER)
    total = 400
    reports: list[StepReport] = []
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:

        async def produce() -> None:
            for n in range(total):
                await publish(nc, "adder.in", {"value": n}, id=f"ev-{n}")
                await asyncio.sleep(0.002)

        producer = asyncio.create_task(produce())
        await eventually(lambda: len(reports) >= total // 4, message="load flowing")
        v2, _ = await push_module_file(registry, module_path("echo"), name="adder", version="2")
        await apply(ADDER)  # `adder` now resolves to adder@2: the step switches
        await eventually(lambda: worker.modules.get("acme.adder.add") == v2.sha256, timeout=10)
        await producer
        await worker.drain(timeout=30)
    found = await stored(nc, "adder.out")
    per_input = Counter(e.run for e in found)
    assert sorted(per_input) == sorted(f"ev-{n}" for n in range(total)), "an event was lost"
    assert set(per_input.values()) == {1}, "an event was processed twice"
    by_version = Counter(
        "v1" if e.data["value"] == int(e.run.removeprefix("ev-")) + 10 else "v2" for e in found
    )
    assert by_version["v1"] > 0 and by_version["v2"] > 0, by_version
    # Once switched, no event went back to the old version.
    order = [("v1" if e.data["value"] == int(e.run[3:]) + 10 else "v2") for e in found]
    assert order == sorted(order), "old and new versions interleaved after the switch"


async def test_removed_step_and_workflow_stop_after_in_flight_events(
    nc: Client, settings: Settings, push: Any, apply: Any, registry: Registry
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    two_steps = """
name: pair
org: acme
trigger: pair.in
steps:
  - {name: add, module: add_ten, function: add_ten, next: [times], publish: [pair.added]}
  - {name: times, module: multiply_by_five, function: multiply_by_five, publish: [pair.out]}
"""
    await apply(two_steps)
    async with Worker(nc, settings=settings) as worker:
        await eventually(lambda: len(worker.steps) == 2)
        await publish(nc, "pair.in", {"value": 1})
        await worker.drain()
        assert [e.data["value"] for e in await stored(nc, "pair.out")] == [55]
        one_step = two_steps.replace(", next: [times]", "").split("  - {name: times")[0]
        await apply(one_step)
        await eventually(lambda: worker.steps == ["acme.pair.add"], message="times stopped")
        await publish(nc, "pair.in", {"value": 2})
        await worker.drain()
        assert [e.data["value"] for e in await stored(nc, "pair.added")] == [11, 12]
        await remove_workflow(nc.jetstream(), registry, "pair")
        await eventually(lambda: worker.steps == [], message="workflow stopped")
    assert [e.data["value"] for e in await stored(nc, "pair.out")] == [55]
