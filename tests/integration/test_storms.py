"""Event storms and oversized workflows (issue 14) on a real nats-server.

Two workflows publishing to each other's trigger are refused at apply; declared
as a bounded loop they run, and the run is dead-lettered (kind ``hops``) after
the bound. A workflow too large to store leaves no stream subject or consumer
behind; a 1,500-step chain applies.
"""

from __future__ import annotations

import json
import time
from typing import Any

import nats.js.errors
import pytest
from nats.aio.client import Client

from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.errors import ConfigError
from deadlift.model import topology
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow, parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import publish, recreated, stored

PING = """
name: ping
org: acme
trigger: ping.in
steps:
  - {name: send, module: add_ten, function: add_ten, publish: [pong.in]}
"""
PONG = """
name: pong
org: acme
trigger: pong.in
steps:
  - {name: reply, module: add_ten, function: add_ten, publish: [ping.in, pong.seen]LOOP}
"""


def doc(text: str, source: str) -> tuple[Workflow, str]:
    return parse_workflow(text, source=source), source


async def consumers(nc: Client, stream: str) -> set[str]:
    js = nc.jetstream()
    try:
        return {c.name for c in await js.consumers_info(stream)}
    except nats.js.errors.NotFoundError:
        return set()


async def event_subjects(nc: Client) -> list[str]:
    try:
        info = await nc.jetstream().stream_info(Stream.EVENTS)
    except nats.js.errors.NotFoundError:
        return []
    return list(info.config.subjects or [])


async def test_workflows_publishing_to_each_others_triggers_are_refused(
    nc: Client, registry: Registry, settings: Settings, push: Any
) -> None:
    await push("add_ten")
    js = nc.jetstream()
    pong = PONG.replace("LOOP", "")
    with pytest.raises(ConfigError) as together:
        await apply_workflows(
            js, registry, settings, [doc(PING, "ping.yaml"), doc(pong, "pong.yaml")]
        )
    assert "ping.yaml, pong.yaml: workflows acme.ping, acme.pong form a cycle" in str(
        together.value
    )
    assert await registry.workflows() == []
    assert await event_subjects(nc) == []

    await apply_workflows(js, registry, settings, [doc(PING, "ping.yaml")])  # alone: no cycle
    before = (await event_subjects(nc), await consumers(nc, Stream.EVENTS))
    with pytest.raises(ConfigError) as later:  # closing the cycle with a stored workflow
        await apply_workflows(js, registry, settings, [doc(pong, "pong.yaml")])
    message = str(later.value)
    assert message.startswith("pong.yaml: workflows acme.ping, acme.pong form a cycle")
    assert "acme.ping step 'send' publishes pong.in, trigger pong.in of acme.pong" in message
    assert "acme.pong step 'reply' publishes ping.in, trigger ping.in of acme.ping" in message
    assert [w.key for w in await registry.workflows()] == ["acme.ping"]
    assert (await event_subjects(nc), await consumers(nc, Stream.EVENTS)) == before


async def test_a_declared_loop_runs_until_its_bound_then_is_dead_lettered(
    nc: Client, registry: Registry, settings: Settings, push: Any
) -> None:
    await push("add_ten")
    pong = PONG.replace("LOOP", ", loop: {max_hops: 5}")
    await apply_workflows(
        nc.jetstream(), registry, settings, [doc(PING, "ping.yaml"), doc(pong, "pong.yaml")]
    )
    reports: list[StepReport] = []
    started = time.monotonic()
    async with Worker(nc, settings=settings, observers=[reports.append]) as worker:
        await publish(nc, "ping.in", {"value": 0})
        await worker.drain()
    elapsed = time.monotonic() - started

    # Hops: send at 0, 2, 4, 6; reply at 1, 3, 5; reply at 7 is over loop.max_hops 5.
    ran = [(r.workflow, r.outcome, r.error_kind) for r in reports]
    assert ran.count(("ping", "ok", None)) == 4
    assert ran.count(("pong", "ok", None)) == 3
    assert ran.count(("pong", "dead", "hops")) == 1
    assert len(ran) == 8
    seen = await stored(nc, "pong.seen")
    assert [e.data["value"] for e in seen] == [20, 40, 60]
    assert [events.hop_count(e) for e in seen] == [2, 4, 6]
    [letter] = await dlq.letters(nc.jetstream())
    assert (letter.workflow, letter.step, letter.kind) == ("pong", "reply", "hops")
    assert "after 7 hops, over the limit of 5 (the step's loop.max_hops)" in letter.error
    assert elapsed < 30


async def test_a_workflow_too_large_to_store_leaves_nothing_behind(
    nc: Client, registry: Registry, settings: Settings, push: Any
) -> None:
    await push("add_ten")
    text = json.dumps(
        {
            "name": "big",
            "org": "acme",
            "description": "x" * 2_000_000,
            "trigger": "big.in",
            "steps": [{"name": "add", "module": "add_ten", "function": "add_ten"}],
        }
    )
    with pytest.raises(ConfigError) as caught:
        await apply_workflows(nc.jetstream(), registry, settings, [doc(text, "big.yaml")])
    assert str(caught.value).startswith("big.yaml: description: the workflow is 2000")
    assert "big.in" not in await event_subjects(nc)
    steps = await consumers(nc, Stream.STEPS)
    trigger = await consumers(nc, Stream.EVENTS)
    assert topology.consumer_name("acme", "big", "add") not in steps
    assert topology.trigger_consumer("acme", "big", "add") not in trigger
    assert await registry.workflows() == []


def long_chain(n: int) -> str:
    steps = [
        {"name": f"s{i}", "module": "add_ten", "function": "add_ten"}
        | ({"next": [f"s{i + 1}"]} if i < n - 1 else {})
        for i in range(n)
    ]
    return json.dumps({"name": "long", "org": "acme", "trigger": "long.in", "steps": steps})


async def test_a_1500_step_chain_applies(
    nc: Client, registry: Registry, settings: Settings, push: Any
) -> None:
    await push("add_ten")
    js = nc.jetstream()
    # A stream made elsewhere with a consumer ceiling (nats-server's own default is
    # 1,000): apply is refused at step 1,000 (room is kept for the consumers made on
    # demand) and leaves no consumer behind.
    await recreated(
        lambda: js.add_stream(name=Stream.STEPS, subjects=["deadlift.step.>"], max_consumers=1000)
    )
    with pytest.raises(ConfigError, match=r"s1000': cannot create consumer .*maximum consumers"):
        await apply_workflows(js, registry, settings, [doc(long_chain(1500), "long.yaml")])
    assert (await js.stream_info(Stream.STEPS)).state.consumer_count == 0
    assert await registry.workflows() == []
    # The streams Deadlift creates have no per-stream ceiling: the account's holds.
    await js.delete_stream(Stream.STEPS)
    started = time.monotonic()
    [applied] = await apply_workflows(js, registry, settings, [doc(long_chain(1500), "long.yaml")])
    assert len(applied.steps) == 1500
    assert len((await registry.workflow("acme.long")).steps) == 1500
    # Each step's own consumer, and the steps stream, come with the first event sent to
    # it; s0's trigger's with the first event a worker finds for it.
    assert Stream.STEPS not in {str(i.config.name) for i in await js.streams_info()}
    assert (await js.stream_info(Stream.EVENTS)).state.consumer_count == 0
    assert time.monotonic() - started < 60
