"""A step's own consumer is made by the first event sent to it, not by ``workflow apply``.

Only Deadlift writes a step's subject: the step before it (its first output makes
the consumer) and ``dlq replay`` (the only writer of an entry step's). Every
consumer costs nats-server ~40 KB for as long as it exists: a host's thousands of
workflows applied and not yet run hold none (a trigger's: ``test_lazy_triggers``).
Real nats-server, real modules.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.checks import ConsumerChecks
from deadlift.bus.registry import Registry
from deadlift.model import topology
from deadlift.model.topology import Stream
from deadlift.ops import dead_letters
from deadlift.ops.control import push_module_file
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import consumer_names, eventually, module_path, publish, recreated, stored

CHAIN = """
name: chain
org: acme
trigger: chain.in
steps:
  - {name: first, module: add_ten, function: add_ten, next: [second]}
  - {name: second, module: add_ten, function: add_ten, next: [third]}
  - {name: third, module: add_ten, function: add_ten, publish: [chain.out]}
"""
ENTRY = topology.consumer_name("acme", "chain", "first")
FIXABLE = """
name: fixable
org: acme
trigger: fix.in
steps:
  - {name: only, module: fixme, function: add_ten, publish: [fix.out],
     retry: {max_attempts: 1}}
"""


async def test_apply_makes_no_consumer(nc: Client, push: Any, apply: Any) -> None:
    await push("add_ten")
    await apply(CHAIN)
    assert await consumer_names(nc, Stream.STEPS) == set()
    assert await consumer_names(nc, Stream.EVENTS) == set()  # the trigger's: test_lazy_triggers


async def test_a_workflow_runs_end_to_end_without_it(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await apply(CHAIN)
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "chain.in", {"value": 1})
        await worker.drain()
        [out] = await stored(nc, "chain.out")
        assert out.data == {"value": 31}
    # Made by the first output sent to each; the entry step's only by a replay.
    assert await consumer_names(nc, Stream.STEPS) == {
        topology.consumer_name("acme", "chain", "second"),
        topology.consumer_name("acme", "chain", "third"),
    }


async def test_the_first_replay_into_an_entry_step_makes_it_and_a_running_worker_runs_it(
    nc: Client, settings: Settings, registry: Registry, apply: Any
) -> None:
    """The user's path: a step fails, a fixed module is pushed and applied, the letter
    replayed; the worker, waiting cold on the entry step's subject, runs it."""
    await push_module_file(registry, module_path("hostile"), name="fixme", version="1")
    await apply(FIXABLE.replace("add_ten", "trap"))
    name = topology.consumer_name("acme", "fixable", "only")
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "fix.in", {"value": 1}, id="e1")
        await worker.drain()
        [letter] = await dlq.letters(nc.jetstream())
        assert name not in await consumer_names(nc, Stream.STEPS)

        fixed, _ = await push_module_file(
            registry, module_path("add_ten"), name="fixme", version="2"
        )
        await apply(FIXABLE)
        await eventually(
            lambda: worker.modules.get("acme.fixable.only") == fixed.sha256,
            message="worker runs fixme@2",
        )
        publisher = bus.JetStreamPublisher(nc)
        [result] = await dead_letters.replay(nc.jetstream(), publisher, registry, [letter.id])
        assert result.outcome == "replayed"
        assert name in await consumer_names(nc, Stream.STEPS)  # made by the replay
        await eventually(lambda: _stored_count(nc, "fix.out"), message="the replayed event ran")
        await worker.drain()
    [out] = await stored(nc, "fix.out")
    assert out.data == {"value": 11}
    assert await dlq.letters(nc.jetstream()) == []


async def _stored_count(nc: Client, subject: str) -> bool:
    return bool(await stored(nc, subject))


async def test_a_worker_started_after_the_replay_runs_it(
    nc: Client, settings: Settings, registry: Registry, apply: Any
) -> None:
    await push_module_file(registry, module_path("hostile"), name="fixme", version="1")
    await apply(FIXABLE.replace("add_ten", "trap"))
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "fix.in", {"value": 2}, id="e2")
        await worker.drain()
    [letter] = await dlq.letters(nc.jetstream())
    await push_module_file(registry, module_path("add_ten"), name="fixme", version="2")
    await apply(FIXABLE)
    publisher = bus.JetStreamPublisher(nc)
    await dead_letters.replay(nc.jetstream(), publisher, registry, [letter.id])
    async with Worker(nc, settings=settings) as worker:
        await worker.drain()
    [out] = await stored(nc, "fix.out")
    assert out.data == {"value": 12}


async def test_steps_that_never_go_cold_make_it_at_start(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """With ``idle_cold_s`` 0 nothing would wait for a replay's ring: the consumer is made."""
    await push("add_ten")
    await apply(CHAIN)
    always_warm = settings.model_copy(update={"idle_cold_s": 0.0})
    async with Worker(nc, settings=always_warm):
        await eventually(
            lambda: _has_consumer(nc, ENTRY), message="the entry step's consumer is made"
        )


async def _has_consumer(nc: Client, name: str) -> bool:
    return name in await consumer_names(nc, Stream.STEPS)


async def test_a_check_of_a_consumer_not_made_yet_finds_no_work(
    nc: Client, push: Any, apply: Any
) -> None:
    """Asked singly and in a listing, with and without the steps stream: absent is idle
    for one made on demand, else unsure."""
    await push("add_ten")
    await apply(CHAIN)
    checks = ConsumerChecks(nc)
    try:
        for _ in ("no steps stream yet", "the stream, not the consumer"):
            assert await checks.has_work(Stream.STEPS, ENTRY, absent=False) is False
            assert await checks.has_work(Stream.STEPS, ENTRY) is True
            await bus.ensure_steps_stream(nc.jetstream(), Settings())
        checks.note_sizes({Stream.STEPS: 1})  # few consumers: answered by a listing
        many = [checks.has_work(Stream.STEPS, f"gone-{i}") for i in range(80)]
        answers = await asyncio.gather(checks.has_work(Stream.STEPS, ENTRY, absent=False), *many)
        assert answers[0] is False
        assert all(answers[1:])  # not made on demand: a missing one is trouble, so pull
        assert checks.stats["pages"] >= 1
    finally:
        await checks.close()


TWO = """
name: two
org: acme
trigger: two.in
steps:
  - {name: first, module: add_ten, function: add_ten, next: [second], retry: {max_attempts: 1}}
  - {name: second, module: add_ten, function: add_ten, publish: [two.out]}
"""


async def test_a_next_steps_consumer_the_server_refuses_fails_the_event_saying_why(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """Apply keeps room for the consumers made on demand; taken meanwhile, the first
    output cannot be sent: the event is dead-lettered naming the consumer, not lost."""
    await push("add_ten")
    js = nc.jetstream()
    await recreated(
        lambda: js.add_stream(name=Stream.STEPS, subjects=["deadlift.step.>"], max_consumers=2)
    )
    await apply(TWO)  # room for first's and second's own consumers: kept, not made
    for squatter in ("a", "b"):
        config = ConsumerConfig(durable_name=squatter, filter_subject=f"deadlift.step.x.{squatter}")
        await js.add_consumer(Stream.STEPS, config)
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "two.in", {"value": 1}, id="e1")
        await worker.drain()
    [letter] = await dlq.letters(js)
    assert letter.step == "first"
    assert "cannot create consumer acme--two--second" in letter.error
    assert "maximum consumers" in letter.error
    assert await stored(nc, "two.out") == []
