"""A trigger's consumer is made by the first worker to find an event for it.

``workflow apply`` records where each trigger's consumer will deliver from (the
stream's next sequence, ``Workflow.starts``) and makes nothing: a workflow
applied and never run costs the server no consumer. A worker makes it when an
event rings its cold step, or when its check at start finds events sent while no
worker ran. No event sent after the apply is lost; none sent before is run.
Real nats-server, real modules.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from deadlift.bus.on_demand import StreamTails
from deadlift.bus.registry import Registry
from deadlift.model import topology
from deadlift.model.topology import Stream
from deadlift.model.workflow import TriggerStart
from deadlift.ops.status import step_counts
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import consumer_names, eventually, publish, stored

ONE = """
name: one
org: acme
trigger: one.in
steps:
  - {name: only, module: add_ten, function: add_ten, publish: [one.out]}
"""
TRIGGER = topology.trigger_consumer("acme", "one", "only")


async def values(nc: Client, subject: str) -> list[int]:
    return sorted(e.data["value"] for e in await stored(nc, subject))


async def test_apply_makes_no_consumer_and_records_where_the_trigger_starts(
    nc: Client, push: Any, apply: Any, registry: Registry
) -> None:
    await push("add_ten")
    await apply(ONE)
    assert await consumer_names(nc, Stream.EVENTS) == set()
    info = await nc.jetstream().stream_info(Stream.EVENTS)
    workflow = await registry.workflow("one")
    assert workflow.starts == {
        TRIGGER: TriggerStart(seq=info.state.last_seq + 1, stream_created=info.created)
    }


async def test_events_sent_while_no_worker_ran_are_run_and_earlier_ones_are_not(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """The check a worker's cold step makes at start finds them, and makes the consumer
    from the apply's position: the event sent before the apply stays unrun."""
    await push("add_ten")
    await apply(ONE)
    await publish(nc, "one.in", {"value": 1})
    await apply(ONE.replace("name: one", "name: late").replace("one.out", "late.out"))
    for value in (2, 3, 4):
        await publish(nc, "one.in", {"value": value})
    assert await consumer_names(nc, Stream.EVENTS) == set()
    async with Worker(nc, settings=settings) as worker:
        await eventually(lambda: _count(nc, "late.out", 3), message="late ran 2, 3, 4")
        await worker.drain()
    assert await values(nc, "late.out") == [12, 13, 14]
    assert await values(nc, "one.out") == [11, 12, 13, 14]


async def _count(nc: Client, subject: str, n: int) -> bool:
    return len(await stored(nc, subject)) >= n


async def test_a_cold_workers_first_event_rings_it_and_makes_the_consumer(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await apply(ONE)
    async with Worker(nc, settings=settings) as worker:
        await asyncio.sleep(1.5)  # past the check at start: cold, nothing made
        assert await consumer_names(nc, Stream.EVENTS) == set()
        await publish(nc, "one.in", {"value": 5})
        await eventually(lambda: _count(nc, "one.out", 1), message="the event ran")
        await worker.drain()
    assert await consumer_names(nc, Stream.EVENTS) == {TRIGGER}
    assert await values(nc, "one.out") == [15]


async def test_a_re_apply_keeps_the_start_so_events_sent_between_are_run(
    nc: Client, settings: Settings, push: Any, apply: Any, registry: Registry
) -> None:
    await push("add_ten")
    await apply(ONE)
    first = (await registry.workflow("one")).starts
    await publish(nc, "one.in", {"value": 1})
    await apply(ONE.replace("publish: [one.out]", "publish: [one.out], concurrency: 2"))
    assert (await registry.workflow("one")).starts == first
    async with Worker(nc, settings=settings) as worker:
        await eventually(lambda: _count(nc, "one.out", 1), message="the event ran")
        await worker.drain()
    assert await values(nc, "one.out") == [11]


async def test_a_start_written_in_the_document_is_ignored(
    nc: Client, settings: Settings, push: Any, apply: Any, registry: Registry
) -> None:
    """Apply decides where a trigger starts: a document cannot make it run old events."""
    await push("add_ten")
    await apply(ONE.replace("one.in", "old.in"))  # a stream capturing old.in
    await publish(nc, "old.in", {"value": 1})
    forged = ONE.replace("name: one", "name: forged").replace("one.out", "forged.out")
    forged = forged.replace("one.in", "old.in") + f"starts: {{{_forged()}: {{seq: 1}}}}\n"
    await apply(forged)
    assert (await registry.workflow("forged")).starts[_forged()].seq > 1
    await publish(nc, "old.in", {"value": 2})
    async with Worker(nc, settings=settings) as worker:
        await eventually(lambda: _count(nc, "forged.out", 1), message="the new event ran")
        await worker.drain()
    assert await values(nc, "forged.out") == [12]


def _forged() -> str:
    return topology.trigger_consumer("acme", "forged", "only")


async def test_a_trigger_whose_stream_was_made_again_runs_the_new_streams_events(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """A stream deleted and made again numbers from 1: its events all came after the
    apply, though their sequences are below the start recorded in the old stream."""
    await push("add_ten")
    await apply(ONE)
    for value in range(3):
        await publish(nc, "one.in", {"value": value})
    await apply(ONE.replace("name: one", "name: late").replace("one.out", "late.out"))
    await nc.jetstream().delete_stream(Stream.EVENTS)  # an operator's reset
    async with Worker(nc, settings=settings) as worker:  # makes the stream again
        await publish(nc, "one.in", {"value": 7})
        await eventually(lambda: _count(nc, "late.out", 1), message="late ran 7")
        await worker.drain()
    assert await values(nc, "late.out") == [17]
    assert await values(nc, "one.out") == [17]


async def test_wildcard_and_several_triggers_find_events_sent_before_a_worker_came(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await apply(ONE.replace("trigger: one.in", "trigger: [shop.*.order, shop.refund]"))
    await publish(nc, "shop.eu.order", {"value": 1})
    await publish(nc, "shop.refund", {"value": 2})
    async with Worker(nc, settings=settings) as worker:
        await eventually(lambda: _count(nc, "one.out", 2), message="both triggers ran")
        await worker.drain()
    assert await values(nc, "one.out") == [11, 12]


async def test_two_workers_finding_the_same_backlog_run_each_event_once(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await apply(ONE)
    for value in range(20):
        await publish(nc, "one.in", {"value": value}, id=f"e{value}")
    async with Worker(nc, settings=settings) as a, Worker(nc, settings=settings) as b:
        await eventually(lambda: _count(nc, "one.out", 20), message="all 20 ran")
        await a.drain()
        await b.drain()
    assert await values(nc, "one.out") == [v + 10 for v in range(20)]


async def test_status_counts_the_events_waiting_for_a_trigger_not_made_yet(
    nc: Client, push: Any, apply: Any, registry: Registry
) -> None:
    await push("add_ten")
    await apply(ONE)
    workflow = await registry.workflow("one")
    assert (await step_counts(nc.jetstream(), [workflow]))[("acme", "one", "only")].pending == 0
    for value in range(3):
        await publish(nc, "one.in", {"value": value})
    counts = await step_counts(nc.jetstream(), [workflow])
    assert counts[("acme", "one", "only")].pending == 3
    assert await consumer_names(nc, Stream.EVENTS) == set()  # counting made nothing lasting


TWO = """
name: two
org: acme
trigger: two.in
steps:
  - {name: first, module: add_ten, function: add_ten, next: [second]}
  - {name: second, module: add_ten, function: add_ten, publish: [two.out]}
"""


async def test_consumers_made_from_a_start_are_updated_by_a_worker_configured_otherwise(
    nc: Client, settings: Settings, push: Any, apply: Any, registry: Registry
) -> None:
    """The server refuses to change where a consumer delivers from: a worker with another
    ``--concurrency`` or ack wait keeps that (it sent ``new``, was refused, and did not
    start the step)."""
    await push("add_ten")
    await apply(TWO)
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "two.in", {"value": 1})
        await eventually(lambda: _count(nc, "two.out", 1), message="the event ran")
        await worker.drain()
    other = settings.model_copy(update={"ack_wait_s": settings.ack_wait_s + 7, "concurrency": 64})
    async with Worker(nc, settings=other) as worker:
        assert len(worker.steps) == 2
        await publish(nc, "two.in", {"value": 2})
        await eventually(lambda: _count(nc, "two.out", 2), message="the second event ran")
        await worker.drain()
    js = nc.jetstream()
    workflow = await registry.workflow("two")
    made = {
        (Stream.EVENTS, topology.trigger_consumer("acme", "two", "first")),
        (Stream.STEPS, topology.consumer_name("acme", "two", "second")),
    }
    for stream, name in made:
        config: ConsumerConfig = (await js.consumer_info(stream, name)).config
        assert config.ack_wait == settings.ack_wait_s + 7
        assert config.max_ack_pending == 64 * 64
        assert config.opt_start_seq is not None  # where it delivered from, kept
    assert config.opt_start_seq >= 1 and workflow.starts
    assert await values(nc, "two.out") == [21, 22]


async def test_tails_asked_together_share_one_request_sent_after_them(
    nc: Client, push: Any, apply: Any
) -> None:
    """A worker starting thousands of never-run workflows checks every trigger at once:
    one STREAM.INFO answers them, and a question asked later sees what was stored since."""
    await push("add_ten")
    await apply(ONE)
    tails = StreamTails.of(nc.jetstream())
    sent = nc.stats["out_msgs"]
    answers = await asyncio.gather(*(tails.tail(Stream.EVENTS) for _ in range(200)))
    assert nc.stats["out_msgs"] - sent == 1
    assert len({a.last_seq for a in answers if a}) == 1
    before = answers[0]
    assert before is not None
    await publish(nc, "one.in", {"value": 1})
    after = await tails.tail(Stream.EVENTS)
    assert after is not None and after.last_seq == before.last_seq + 1
    assert after.created == before.created
    assert await tails.tail("NO_SUCH_STREAM") is None
