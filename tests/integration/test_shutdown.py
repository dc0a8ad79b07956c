"""A worker that stops mid-backlog leaves nothing to wait out ack_wait, even across a restart.

A batch fetch returns when its short wait ends while the server may still be
sending the rest of the batch; those events are the stopping worker's. Nak'd,
they were lost when the server restarted before redelivering them (naks are not
stored): about a batch per step then waited ack_wait (30 s) — a Ctrl-C of
``deadlift dev`` followed by a new start. Now the worker runs them before it stops.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.js import JetStreamContext

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.model.workflow import parse_workflow
from deadlift.ops.control import apply_workflows
from deadlift.ops.server import EmbeddedServer, free_port
from deadlift.runtime.worker import StepReport, Worker
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import module_path, triggers_made
from tests.manifests import ADD_TEN_CHAIN

CHAIN = ADD_TEN_CHAIN
EVENTS = 3000


def slow_observer(report: StepReport) -> None:
    """A live log that keeps the event loop busy, as `deadlift dev`'s does."""
    time.sleep(0.0005)


async def idle(
    js: JetStreamContext, consumers: list[tuple[str, str]]
) -> dict[str, tuple[int, int]]:
    found = {}
    for stream, name in consumers:
        info = await js.consumer_info(stream, name)
        found[name] = (info.num_pending, info.num_ack_pending)
    return found


async def test_events_delivered_to_a_stopping_worker_are_not_left_for_ack_wait(
    tmp_path: Path,
) -> None:
    port = free_port()
    consumers = [
        # Not the entry step's own (acme--calc--add): that one is made by a replay.
        (Stream.EVENTS, "acme--calc--add--trigger"),
        (Stream.STEPS, "acme--calc--more"),
    ]
    with EmbeddedServer(port=port, store_dir=tmp_path / "store") as server:
        settings = Settings(nats_url=server.url, ack_wait_s=30.0)
        nc = await bus.connect(settings)
        js = nc.jetstream()
        registry = await Registry.open(js)
        await registry.push_module(module_path("add_ten").read_bytes(), name="add_ten")
        await apply_workflows(js, registry, settings, [(parse_workflow(CHAIN), "calc.yaml")])
        await triggers_made(nc, settings)  # by an earlier worker: the backlog is listed at start
        acks = []
        for n in range(EVENTS):
            headers, body = events.encode(events.new_event({"value": n}, source="t", type="t"))
            acks.append(await js.publish_async("calc.in", body, headers=headers))
        await asyncio.gather(*acks)
        stops = []
        for _ in range(3):  # stopped mid-backlog, three times
            worker = Worker(nc, settings=settings, observers=[slow_observer], advertise=False)
            await worker.start()
            await asyncio.sleep(0.3)
            await worker.shutdown()
            stops.append(await idle(js, consumers))
        await nc.drain()
    # What was delivered to each stopped worker was run (acked), not left delivered.
    for after_stop in stops:
        assert all(unacked == 0 for _, unacked in after_stop.values()), stops
    with EmbeddedServer(port=port, store_dir=tmp_path / "store") as server:
        settings = Settings(nats_url=server.url, ack_wait_s=30.0)
        nc = await bus.connect(settings)
        js = nc.jetstream()
        started = time.monotonic()
        async with Worker(nc, settings=settings, advertise=False) as worker:
            await worker.drain(timeout=15)  # far below ack_wait: nothing waits it out
        elapsed = time.monotonic() - started
        out = await js.stream_info(Stream.EVENTS, subjects_filter="calc.out")
        await nc.drain()
    assert sum((out.state.subjects or {}).values()) == EVENTS
    assert elapsed < 15
