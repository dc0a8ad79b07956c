"""Publishes and acks written below nats-py, on a real server: stored as nats-py stores them."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from deadlift import bus
from deadlift.bus import direct
from deadlift.bus.publisher import JetStreamPublisher
from deadlift.settings import Settings
from deadlift.wire import events
from tests.conftest import eventually, raw_messages


@pytest.fixture
async def stream(nc: Client) -> str:
    await nc.jetstream().add_stream(StreamConfig(name="DIRECT", subjects=["direct.>"]))
    return "DIRECT"


async def test_outputs_are_stored_with_the_headers_nats_py_stores(nc: Client, stream: str) -> None:
    publisher = JetStreamPublisher(nc)
    headers, body = events.OutputEncoder.for_step("acme", "calc", "add").encode(
        {"v": 1}, id="out-1", time="2024-01-01T00:00:00Z", run="run é", traceparent=None, hops=1
    )
    first = await publisher.publish_async("direct.ours", body, headers, msg_id="out-1:a")
    again = await publisher.publish_async("direct.ours", body, headers, msg_id="out-1:a")
    assert not (await first).duplicate
    assert (await again).duplicate  # the stream's dedup, as for nats-py's publishes
    await nc.jetstream().publish("direct.theirs", body, headers={**headers, "Nats-Msg-Id": "x"})
    [ours] = await raw_messages(nc, stream, "direct.ours")
    [theirs] = await raw_messages(nc, stream, "direct.theirs")
    assert ours.data == theirs.data
    assert {**ours.headers, "Nats-Msg-Id": "x"} == theirs.headers
    decoded = events.decode(ours.headers, ours.data, fallback_id="-", fallback_source="-")
    assert (decoded.id, decoded.run, decoded.data) == ("out-1", "run é", {"v": 1})


async def test_a_publish_no_stream_takes_fails_its_future(nc: Client, stream: str) -> None:
    future = await JetStreamPublisher(nc).publish_async("nowhere.x", b"", {}, msg_id="m")
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await future


async def test_a_closed_connection_refuses_the_publish(settings: Settings, stream: str) -> None:
    client = await bus.connect(settings, name="deadlift-test-closed")
    publisher = JetStreamPublisher(client)
    assert (await (await publisher.publish_async("direct.a", b"", {}, msg_id="m"))).seq
    await client.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await publisher.publish_async("direct.a", b"", {}, msg_id="m2")


async def test_a_direct_ack_acks(nc: Client, stream: str) -> None:
    js = nc.jetstream()
    await js.add_consumer(
        stream, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    await js.publish("direct.in", b"1")
    sub = await js.pull_subscribe_bind(durable="c", stream=stream)
    [msg] = await sub.fetch(1, timeout=5)
    await direct.ack(msg)

    async def acked() -> bool:
        info = await js.consumer_info(stream, "c")
        return info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1

    await eventually(acked, message="the ack reached the server")
