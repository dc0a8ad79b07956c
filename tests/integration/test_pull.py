"""Batches from a durable consumer: one pull request and one wait per batch."""

from __future__ import annotations

import asyncio
import time

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from deadlift.bus.pull import Pull
from tests.conftest import recreated


async def consumer(nc: Client) -> Pull:
    js = nc.jetstream()
    await recreated(lambda: js.add_stream(StreamConfig(name="PULL", subjects=["pull.>"])))
    await js.purge_stream("PULL")
    await js.add_consumer(
        "PULL", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    pull = Pull(nc, "PULL", "c")
    await pull.start()
    return pull


async def test_a_backlog_comes_in_batches_and_the_rest_at_once(nc: Client) -> None:
    pull = await consumer(nc)
    js = nc.jetstream()
    for i in range(10):
        await js.publish(f"pull.{i}", str(i).encode())
    first = await pull.fetch(4, 0.5, no_wait=True)
    began = time.monotonic()
    rest = await pull.fetch(100, 5.0, no_wait=True)  # fewer than asked: answered at once
    assert time.monotonic() - began < 1.0
    assert [m.data for m in first + rest] == [str(i).encode() for i in range(10)]
    assert first[-1].metadata.num_pending == 6
    for msg in first + rest:
        await msg.ack()
    with pytest.raises(TimeoutError):
        await pull.fetch(8, 0.5, no_wait=True)
    await pull.stop()


async def test_a_long_pull_ends_with_the_next_event_or_times_out(nc: Client) -> None:
    pull = await consumer(nc)
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await pull.fetch(1, 0.3)
    assert 0.25 < time.monotonic() - began < 2.0

    async def later() -> None:
        await asyncio.sleep(0.2)
        await nc.jetstream().publish("pull.late", b"late")

    task = asyncio.create_task(later())
    began = time.monotonic()
    [msg] = await pull.fetch(1, 10.0)
    assert msg.data == b"late" and time.monotonic() - began < 5.0
    await task
    await pull.stop()


async def test_a_gone_consumer_is_an_error_not_a_silent_wait(nc: Client) -> None:
    pull = await consumer(nc)
    await nc.jetstream().delete_consumer("PULL", "c")
    with pytest.raises((nats.js.errors.APIError, nats.errors.Error)):
        await pull.fetch(1, 5.0)
    await pull.stop()
