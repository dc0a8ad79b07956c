"""Crashes, signals and server restarts: every output stored exactly once, nothing lost."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from deadlift import bus
from deadlift.bus.registry import Registry
from deadlift.model.topology import Stream
from deadlift.ops.control import push_module_file
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from tests.conftest import ROOT, eventually, module_path, publish, stored, triggers_made
from tests.integration.test_processes import start_worker

pytestmark = pytest.mark.slow
CALCULATOR = (ROOT / "config" / "workflows" / "calculator.yaml").read_text()


async def outputs(nc: Client, count: int) -> list[Any] | None:
    found = await stored(nc, "calc.out")
    return found if len(found) >= count else None


def exactly_once(found: list[Any], total: int) -> None:
    values = Counter(e.data["value"] for e in found)
    assert sorted(values) == [(n + 10) * 5 for n in range(total)], "an output is missing"
    assert max(values.values()) == 1, "an output is stored twice"
    assert len(found) == total


async def publish_all(nc: Client, total: int) -> None:
    for n in range(total):
        await publish(nc, "calc.in", {"value": n})


def stats(log: str) -> dict[str, int]:
    line = re.findall(r"worker stopped: (.*)", log)[-1]
    return {k: int(v) for k, v in (part.split("=") for part in line.split())}


async def test_kill_9_mid_stream_then_a_new_worker_stores_every_output_once(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    await apply(CALCULATOR)  # ack_wait 5 s (tests/conftest.py): redelivery comes quickly
    total = 600
    first = start_worker(settings, "--concurrency", "4")
    try:
        producer = asyncio.create_task(publish_all(nc, total))
        await eventually(lambda: outputs(nc, 100), timeout=30, message="first outputs")
        first.kill()  # SIGKILL: no drain, no acks for what is in flight
        first.wait(10)
        await producer
        second = start_worker(settings, "--concurrency", "8")
        found = await eventually(lambda: outputs(nc, total), timeout=60, message="all outputs")
        await asyncio.sleep(0.5)  # late duplicates would show up here
        found = await stored(nc, "calc.out")
    finally:
        first.kill()
        log = ""
        if "second" in locals():
            second.send_signal(signal.SIGTERM)
            log = second.communicate(timeout=30)[1]
    exactly_once(found, total)
    middle = await stored(nc, "deadlift.step.acme.calculator.multiply", Stream.STEPS)
    assert len(middle) == total  # the intermediate step's outputs too
    assert stats(log)["dead"] == 0


async def test_sigterm_during_a_burst_finishes_in_flight_and_exits_promptly(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    await push("add_ten")
    await push("multiply_by_five")
    await apply(CALCULATOR)
    total = 3000
    await publish_all(nc, total)
    first = start_worker(settings, "--concurrency", "4")
    await eventually(lambda: outputs(nc, 50), timeout=30, message="first outputs")
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    _, log = first.communicate(timeout=30)
    took = time.monotonic() - started
    assert first.returncode == 0, log
    assert took < 10, f"shutdown took {took:.1f} s"
    done_by_first = stats(log)["ok"]
    assert 0 < done_by_first < 2 * total  # it stopped part-way

    second = start_worker(settings, "--concurrency", "8")
    try:
        found = await eventually(lambda: outputs(nc, total), timeout=60, message="all outputs")
    finally:
        second.send_signal(signal.SIGTERM)
        second_log = second.communicate(timeout=30)[1]
    exactly_once(found, total)
    # Nothing the first worker had published came back to be published again.
    assert stats(second_log)["duplicate"] == 0, second_log
    assert stats(log)["ok"] + stats(second_log)["ok"] == 2 * total


@pytest.fixture
async def restartable(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    server = EmbeddedServer(store_dir=tmp_path / "store")
    server.start()
    yield server
    server.stop()


async def test_server_restart_mid_stream_loses_nothing(restartable: EmbeddedServer) -> None:
    settings = Settings(nats_url=restartable.url, ack_wait_s=5.0)
    nc = await bus.connect(settings, name="deadlift-test")
    registry = await Registry.open(nc.jetstream())
    for name in ("add_ten", "multiply_by_five"):
        await push_module_file(registry, module_path(name))
    from deadlift.model.workflow import parse_workflow
    from deadlift.ops.control import apply_workflows

    await apply_workflows(
        nc.jetstream(), registry, settings, [(parse_workflow(CALCULATOR), "calc.yaml")]
    )
    total = 300
    worker = Worker(nc, settings=settings)
    try:
        await worker.start()
        await publish_all(nc, total // 2)
        await eventually(lambda: outputs(nc, 20), timeout=30)
        restartable.kill()  # SIGKILL the server: file store, nothing acknowledged may be lost
        restartable.start()
        await eventually(lambda: nc.is_connected, timeout=20, message="reconnected")
        for n in range(total // 2, total):
            await _publish_until_acked(nc, n)
        found = await eventually(lambda: outputs(nc, total), timeout=60, message="all outputs")
    finally:
        await worker.shutdown()
        await nc.drain()
    exactly_once(found, total)


async def _publish_until_acked(nc: Client, n: int) -> None:
    """A producer retrying through the restart (same id: deduplicated)."""
    event_id = f"restart-{n}"
    for _ in range(50):
        try:
            await publish(nc, "calc.in", {"value": n}, id=event_id)
            return
        except Exception:
            await asyncio.sleep(0.2)
    raise AssertionError(f"could not publish event {n}")


async def test_redeliveries_without_a_failure_never_dead_letter_a_healthy_event(
    nc: Client, settings: Settings, push: Any, apply: Any
) -> None:
    """Deliveries that died with a worker (or lost their ack) are not failed attempts."""
    from deadlift.bus import dlq

    await push("add_ten")
    await push("multiply_by_five")
    await apply(CALCULATOR)  # retry: max_attempts 3
    await publish(nc, "calc.in", {"value": 1})
    await triggers_made(nc, settings)  # as the first worker to find the event did
    consumer = nc.jetstream()
    sub = await consumer.pull_subscribe_bind(
        durable="acme--calculator--add--trigger", stream=Stream.EVENTS
    )
    for _ in range(4):  # four deliveries that never finished: crashed workers, say
        [msg] = await sub.fetch(1, timeout=5)
        await msg.nak()
    await sub.unsubscribe()
    async with Worker(nc, settings=settings) as worker:
        await worker.drain(timeout=15)
    found = await stored(nc, "calc.out")
    assert [e.data for e in found] == [{"value": 55}]
    assert await dlq.letters(nc.jetstream()) == []
    info = await nc.jetstream().consumer_info(Stream.EVENTS, "acme--calculator--add--trigger")
    assert info.config.max_deliver == -1  # the server never drops an event silently
