"""Dead letters without a server: every failed event can be dead-lettered, whatever its size.

A letter that would not fit in ``max_payload`` keeps the event by reference in a
body store (here in memory) and carries a header pointing at it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nats.js.errors

from deadlift.bus import dlq
from deadlift.bus.publisher import MSG_ID, MemoryPublisher, Published
from deadlift.model import topology
from deadlift.model.topology import Stream
from tests.unit import test_step
from tests.unit.test_step import event_msg, flaky, letters

# The step-loop harness of test_step (real modules, fake deliveries; host and
# executor come from tests/unit/conftest.py).
make = test_step.make

LIMIT = 8192


class MemoryBodies:
    """A :class:`~deadlift.bus.dlq.BodyStore` in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put(self, name: str, data: bytes) -> None:
        self.objects[name] = data

    async def get(self, name: str) -> bytes | None:
        return self.objects.get(name)

    async def delete(self, name: str) -> None:
        self.objects.pop(name, None)


class _Result:
    def __init__(self, data: bytes) -> None:
        self.data = data


class FakeBucket:
    """The part of nats-py's ObjectStore that dead letters use, over a :class:`MemoryBodies`."""

    def __init__(self, bodies: MemoryBodies) -> None:
        self.bodies = bodies

    async def put(self, name: str, data: bytes, meta: Any = None) -> None:
        await self.bodies.put(name, data)

    async def get(self, name: str) -> _Result:
        data = await self.bodies.get(name)
        if data is None:
            raise nats.js.errors.ObjectNotFoundError
        return _Result(data)

    async def delete(self, name: str) -> None:
        await self.bodies.delete(name)


class FakeJetStream:
    """A JetStream context with one object store bucket, created on first use."""

    def __init__(self) -> None:
        self.bodies = MemoryBodies()
        self.created: list[str] = []

    async def object_store(self, bucket: str) -> FakeBucket:
        if bucket not in self.created:
            raise nats.js.errors.NotFoundError
        return FakeBucket(self.bodies)

    async def create_object_store(self, bucket: str, config: Any = None) -> FakeBucket:
        self.created.append(bucket)
        return FakeBucket(self.bodies)


async def record(
    publisher: MemoryPublisher,
    body: bytes,
    headers: dict[str, str],
    *,
    error: str = "boom",
    store: dlq.BodyStore | None = None,
) -> Published:
    await dlq.record(
        publisher,
        org="acme",
        workflow="flaky",
        step="fails",
        module="0" * 64,
        subject="flaky.in",
        headers=headers,
        body=body,
        stream=Stream.EVENTS,
        seq=7,
        attempts=3,
        kind="trap",
        error=error,
        store=store,
    )
    [letter] = publisher.messages
    return letter


def wire_size(message: Published) -> int:
    return dlq.letter_size(message.headers, message.body)


def as_stored(message: Published, seq: int = 1) -> dlq.DeadLetter:
    return dlq.parse(seq, message.headers, message.body)


async def test_a_letter_that_fits_keeps_the_body_inline() -> None:
    publisher, store = MemoryPublisher(max_payload=LIMIT), MemoryBodies()
    letter = await record(publisher, b"small", {"ce-id": "e1"}, store=store)
    assert letter.body == b"small"
    assert dlq.H_BODY_REF not in letter.headers
    assert store.objects == {}


async def test_an_event_cannot_forge_a_body_reference() -> None:
    publisher, store = MemoryPublisher(max_payload=LIMIT), MemoryBodies()
    store.objects["victim"] = b"another letter's body"
    letter = await record(publisher, b"", {dlq.H_BODY_REF: "victim"}, store=store)
    assert dlq.H_BODY_REF not in letter.headers
    assert (await dlq.load(store, as_stored(letter))).body == b""


async def test_an_event_near_max_payload_is_dead_lettered_by_reference() -> None:
    publisher, store = MemoryPublisher(max_payload=LIMIT), MemoryBodies()
    headers = {"ce-id": "e1", "ce-type": "big"}
    body = b"x" * (LIMIT - 300)  # fits as an event; not with the Deadlift-* headers
    assert dlq.letter_size(headers, body) <= LIMIT

    message = await record(publisher, body, headers, store=store)

    assert message.body == b""
    assert wire_size(message) <= LIMIT
    ref = message.headers[dlq.H_BODY_REF]
    assert ref == topology.dead_letter_object(message.headers[MSG_ID])
    assert list(store.objects) == [ref]
    assert message.headers["ce-id"] == "e1"  # the original headers stay when they fit
    loaded = await dlq.load(store, as_stored(message))
    assert (loaded.body, loaded.original_headers()) == (body, headers)
    assert loaded.summary()["ref"] == ref


async def test_headers_too_large_for_a_letter_are_kept_by_reference_too() -> None:
    publisher, store = MemoryPublisher(max_payload=LIMIT), MemoryBodies()
    headers = {"ce-id": "e1", "x-huge": "h" * (LIMIT - 200)}

    message = await record(publisher, b"body", headers, store=store)

    assert wire_size(message) <= LIMIT
    assert "x-huge" not in message.headers
    loaded = await dlq.load(store, as_stored(message))
    assert (loaded.body, loaded.original_headers()) == (b"body", headers)


async def test_the_error_text_is_cut_to_fit_counting_utf8_bytes() -> None:
    limit = 1200
    publisher, store = MemoryPublisher(max_payload=limit), MemoryBodies()
    message = await record(publisher, b"x" * 900, {"ce-id": "e1"}, error="☠" * 900, store=store)
    assert wire_size(message) <= limit
    assert message.headers[dlq.H_ERROR].startswith("☠")
    assert set(message.headers[dlq.H_ERROR]) == {"☠"}  # no half character


async def test_a_letter_by_reference_is_written_once_when_recorded_again() -> None:
    publisher, store = MemoryPublisher(max_payload=LIMIT), MemoryBodies()
    body = b"y" * LIMIT
    first = await record(publisher, body, {"ce-id": "e1"}, store=store)
    await record(publisher, body, {"ce-id": "e1"}, store=store)  # a redelivery fails again
    assert publisher.messages == [first]
    assert len(store.objects) == 1


async def test_the_step_dead_letters_an_event_near_max_payload_instead_of_looping(
    make: Any,
) -> None:
    h = make(flaky("trap"), publisher=MemoryPublisher(max_payload=LIMIT))
    js = FakeJetStream()
    h.runner.context = dataclasses.replace(h.runner.context, js=js)
    msg = event_msg({"pad": ""}, "flaky.in", attempt=3)
    pad = LIMIT - 350 - dlq.letter_size(msg.headers or {}, msg.data)
    msg = event_msg({"pad": "p" * pad}, "flaky.in", attempt=3)
    assert LIMIT - 512 < dlq.letter_size(msg.headers or {}, msg.data) <= LIMIT

    await h.deliver(msg)

    assert msg.settled == [("term", None)]  # dead-lettered, not nak'd again and again
    assert h.outcomes() == ["dead"]
    [letter] = letters(h.publisher)
    assert letter.body == b"" and wire_size(letter) <= LIMIT
    assert js.created == [topology.Bucket.DEAD_LETTERS]
    loaded = await dlq.load(js.bodies, as_stored(letter))
    assert loaded.body == msg.data
    assert loaded.original_headers()["ce-id"] == "ev-1"
