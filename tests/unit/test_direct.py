"""Publishes and acks written below nats-py: the bytes it would write, its errors, its PubAcks."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from deadlift.bus import direct
from deadlift.bus.acksubject import delivery
from deadlift.bus.publisher import MSG_ID, JetStreamPublisher
from deadlift.errors import PayloadTooLargeError
from deadlift.wire import events
from tests.unit.fakes import delivered
from tests.unit.test_wire_headers import Capture


class Subscribing(Capture):
    """A capturing client whose subscriptions are only recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: dict[str, Any] = {}

    async def subscribe(self, subject: str, *args: Any, cb: Any = None, **kwargs: Any) -> Any:
        self.callbacks[subject] = cb
        return None


def reply(subject: str, data: bytes, headers: dict[str, str] | None = None) -> Msg:
    return Msg(None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


async def test_a_publish_writes_what_nats_pys_publish_async_writes() -> None:
    nc = Subscribing()
    publisher = JetStreamPublisher(nc)
    headers, body = events.OutputEncoder.for_step("acme", "calc", "add").encode(
        {"v": 1}, id="i", time="t", run="r", traceparent=None
    )
    for sent in (headers, dict(headers)):  # rendered once, or a plain dict
        nc.sent.clear()
        await publisher.publish_async("calc.out", body, sent, msg_id="i:calc.out")
        [ours] = nc.sent
        inbox = ours.split(b" ")[2].decode()
        [prefix] = nc.callbacks
        assert inbox.startswith(prefix[:-1])  # one wildcard inbox for every PubAck
        await nc.publish("calc.out", body, reply=inbox, headers={**sent, MSG_ID: "i:calc.out"})
        assert nc.sent[-1] == ours


async def test_publish_refuses_what_nats_py_refuses() -> None:
    nc = Subscribing()
    publisher = JetStreamPublisher(nc)
    with pytest.raises(nats.errors.BadSubjectError):
        await publisher.publish_async("bad subject", b"", {}, msg_id="m")
    with pytest.raises(nats.errors.BadHeaderError):
        await publisher.publish_async("s", b"", {"bad key": "v"}, msg_id="m")
    with pytest.raises(PayloadTooLargeError):
        await publisher.publish_async("s", b"x" * nc._max_payload, {}, msg_id="m")
    nc._status = nc.DRAINING_PUBS
    with pytest.raises(nats.errors.ConnectionDrainingError):
        await publisher.publish_async("s", b"", {}, msg_id="m")
    nc._status = nc.CLOSED
    with pytest.raises(nats.errors.ConnectionClosedError):
        await publisher.publish_async("s", b"", {}, msg_id="m")


async def test_pubacks_resolve_their_publishes() -> None:
    nc = Subscribing()
    publishes = direct.AsyncPublishes(nc)
    futures = [await publishes.publish("s", b"NATS/1.0\r\n\r\n", b"") for _ in range(6)]
    [(prefix, on_reply)] = nc.callbacks.items()
    inbox = prefix[:-1]
    answers = [
        b'{"stream":"S","seq":1}',
        b'{"stream":"S","seq":2,"duplicate":true}',
        b'{"stream":"S","domain":"d","seq":3}',
        b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
        b"",
    ]
    for n, data in enumerate(answers, 1):
        await on_reply(reply(f"{inbox}{n}", data))
    await on_reply(reply(f"{inbox}6", b"", {"Status": "503"}))
    await on_reply(reply(f"{inbox}99", b'{"stream":"S","seq":9}'))  # nobody waits: ignored
    assert futures[0].result() == nats.js.api.PubAck(stream="S", seq=1)
    assert futures[1].result() == nats.js.api.PubAck(stream="S", seq=2, duplicate=True)
    assert futures[2].result() == nats.js.api.PubAck(stream="S", seq=3, domain="d")
    assert isinstance(futures[3].exception(), nats.js.errors.APIError)
    assert futures[4].exception() is not None
    assert isinstance(futures[5].exception(), nats.js.errors.NoStreamResponseError)
    assert publishes.pending == 0


async def test_a_full_window_waits_for_a_puback_or_a_given_up_publish() -> None:
    nc = Subscribing()
    publishes = direct.AsyncPublishes(nc, max_pending=2)
    first = [await publishes.publish("s", b"NATS/1.0\r\n\r\n", b"") for _ in range(2)]
    third = asyncio.create_task(publishes.publish("s", b"NATS/1.0\r\n\r\n", b""))
    await asyncio.sleep(0.01)
    assert not third.done()
    [(prefix, on_reply)] = nc.callbacks.items()
    await on_reply(reply(f"{prefix[:-1]}2", b'{"stream":"S","seq":2}'))
    await asyncio.wait_for(third, 2)
    fourth = asyncio.create_task(publishes.publish("s", b"NATS/1.0\r\n\r\n", b""))
    await asyncio.sleep(0.01)
    assert not fourth.done()
    first[0].cancel()  # its PubAck never came: the caller gave up on it
    await asyncio.wait_for(fourth, 2)


async def test_an_ack_writes_what_msg_ack_writes() -> None:
    nc = Capture()
    ours = Msg(nc, subject="s", reply="$JS.ACK.S.C.1.2.3.4.5", data=b"")
    theirs = Msg(nc, subject="s", reply="$JS.ACK.S.C.1.2.3.4.5", data=b"")
    await direct.ack(ours)
    await theirs.ack()
    assert nc.sent[0] == nc.sent[1]
    with pytest.raises(nats.errors.MsgAlreadyAckdError):
        await direct.ack(ours)
    with pytest.raises(nats.errors.NotJSMessageError):
        await direct.ack(Msg(nc, subject="s", reply="", data=b""))
    fake = delivered("s", b"")
    await direct.ack(fake)  # not nats-py's Msg: its own ack()
    assert fake.outcome == "ack"


@pytest.mark.parametrize(
    "subject",
    [
        "$JS.ACK.STREAM.consumer.3.17.5.1700000000000000000.9",
        "$JS.ACK._.ACCOUNTHASH.STREAM.consumer.3.17.5.1700000000000000000.9",
        "$JS.ACK.domain.ACCOUNTHASH.STREAM.consumer.3.17.5.1700000000000000000.9.token",
    ],
)
def test_delivery_reads_the_ack_subject_as_nats_py_does(subject: str) -> None:
    msg = Msg(None, subject="s", reply=subject)  # type: ignore[arg-type]
    meta = msg.metadata
    assert delivery(msg) == (meta.num_delivered, meta.stream, meta.sequence.stream)


def test_delivery_falls_back_to_the_messages_metadata() -> None:
    assert delivery(delivered("s", b"", attempt=2, seq=7, stream="X")) == (2, "X", 7)
    with pytest.raises(nats.errors.NotJSMessageError):
        delivery(Msg(None, subject="s", reply="$JS.ACK.too.short"))  # type: ignore[arg-type]
