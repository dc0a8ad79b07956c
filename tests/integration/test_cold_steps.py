"""Idle steps go cold: no pull requests at all, and still every event is served at once.

A host runs thousands of mostly idle workflows; a pull request per idle consumer
every few seconds made idle cost grow with them (issue 15). A cold step waits on
a subscription to its subjects instead. These tests hold it to what users would
notice: the next event is served promptly, nothing is stranded (retries waiting
out a delay, events another worker held when it died, a server restart), and
cold steps send the server nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer, free_port
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import eventually, module_path, stored, triggers_made
from tests.manifests import ADD_TEN_CHAIN

CHAIN = ADD_TEN_CHAIN
CONSUMERS = 3  # the trigger's, and each step's input
TRIGGER = "acme--calc--add--trigger"


def cold_settings(url: str, **extra: float) -> Settings:
    return Settings(nats_url=url, idle_cold_s=0.3, idle_pull_s=0.5, **extra)


async def ready(nc: Client, registry: Registry, settings: Settings) -> None:
    await registry.push_module(module_path("add_ten").read_bytes(), name="add_ten")
    await apply_workflows(
        nc.jetstream(), registry, settings, [(parse_workflow(CHAIN), "calc.yaml")]
    )


async def send(nc: Client, *values: int) -> None:
    js = nc.jetstream()
    for value in values:
        headers, body = events.encode(events.new_event({"value": value}, source="t", type="t"))
        await js.publish("calc.in", body, headers=headers)


async def outputs(nc: Client) -> list[int]:
    return sorted(e.data["value"] for e in await stored(nc, "calc.out"))


async def test_idle_steps_go_cold_send_nothing_and_serve_the_next_events_once(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    settings = cold_settings(settings.nats_url)
    await ready(nc, registry, settings)
    worker_nc = await bus.connect(settings, name="deadlift-worker")
    try:
        async with Worker(worker_nc, settings=settings, advertise=False) as worker:
            await eventually(lambda: worker.cold_consumers == CONSUMERS, message="all cold")
            sent = worker_nc.stats["out_msgs"]
            await asyncio.sleep(2.0)  # four long pulls per consumer, were they warm
            assert worker_nc.stats["out_msgs"] == sent, "a cold step sent the server something"

            await send(nc, 1)
            await eventually(lambda: outputs(nc), timeout=3.0, message="the first event served")
            await send(nc, *range(2, 201))
            await eventually(lambda: _count_is(nc, 200), timeout=20.0, message="200 events served")
            assert await outputs(nc) == [v + 20 for v in range(1, 201)]  # each once
            await eventually(lambda: worker.cold_consumers == CONSUMERS, message="cold again")
    finally:
        await worker_nc.close()


async def _count_is(nc: Client, count: int) -> bool:
    return len(await outputs(nc)) >= count


async def test_an_event_another_worker_held_when_it_died_is_served_by_a_cold_step(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    """Redelivered after ack_wait without any publish: nothing rings, the step must not sleep."""
    settings = cold_settings(settings.nats_url, ack_wait_s=2.0)
    await ready(nc, registry, settings)
    other = await nats.connect(settings.nats_url)  # another worker, which dies holding it
    worker_nc = await bus.connect(settings)
    try:
        await send(nc, 5)
        await triggers_made(nc, settings)  # by the worker that found the event
        held = await other.jetstream().pull_subscribe_bind(durable=TRIGGER, stream=Stream.EVENTS)
        assert len(await held.fetch(1, timeout=5)) == 1
        await other.close()  # never acked: back after ack_wait
        async with Worker(worker_nc, settings=settings, advertise=False):
            await eventually(lambda: outputs(nc), timeout=8.0, message="the held event served")
            assert await outputs(nc) == [25]
    finally:
        await worker_nc.close()


async def test_a_retry_waiting_out_its_delay_is_served_by_a_cold_step(
    nc: Client, registry: Registry, settings: Settings
) -> None:
    """A nak with a delay (another worker's retry) comes back without a publish too."""
    settings = cold_settings(settings.nats_url)
    await ready(nc, registry, settings)
    other = await nats.connect(settings.nats_url)
    worker_nc = await bus.connect(settings)
    try:
        await send(nc, 7)
        await triggers_made(nc, settings)  # by the worker that found the event
        held = await other.jetstream().pull_subscribe_bind(durable=TRIGGER, stream=Stream.EVENTS)
        [msg] = await held.fetch(1, timeout=5)
        async with Worker(worker_nc, settings=settings, advertise=False):
            await asyncio.sleep(1.0)  # long enough to go cold, were it allowed to
            await msg.nak(delay=1.5)
            await eventually(lambda: outputs(nc), timeout=8.0, message="the retried event")
            assert await outputs(nc) == [27]
    finally:
        await other.close()
        await worker_nc.close()


async def test_cold_steps_serve_events_after_the_server_restarts(tmp_path: Path) -> None:
    port = free_port()
    store = tmp_path / "store"
    with EmbeddedServer(port=port, store_dir=store) as server:
        settings = cold_settings(server.url)
        nc = await bus.connect(settings)
        await ready(nc, await Registry.open(nc.jetstream()), settings)
        await nc.close()
        worker_nc = await bus.connect(settings)
        worker = Worker(worker_nc, settings=settings, advertise=False)
        await worker.start()
        await eventually(lambda: worker.cold_consumers == CONSUMERS, message="all cold")
    try:
        with EmbeddedServer(port=port, store_dir=store):
            await eventually(lambda: worker_nc.is_connected, timeout=15.0, message="reconnected")
            nc = await bus.connect(settings)
            try:
                await send(nc, 1)
                await eventually(lambda: outputs(nc), timeout=10.0, message="served after restart")
                assert await outputs(nc) == [21]
            finally:
                await nc.close()
            await worker.shutdown()
    finally:
        await worker_nc.close()
