"""Stand-ins for what unit tests do without: a delivered JetStream message that records its
fate, a DNS resolver answering from a table, and a Wasm module Extism cannot load."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from deadlift.model.topology import Stream

Metadata = Msg.Metadata


@dataclass
class FakeMsg:
    """A message as a pull consumer delivers it; ``settled`` records ack/nak/term/in_progress.

    Each entry of ``settled`` is ``(action, delay)``: ``("ack", None)``, ``("nak", 1.0)``,
    ``("term", None)``, ``("in_progress", None)``.
    """

    subject: str
    data: bytes
    headers: dict[str, str] | None
    metadata: Metadata
    settled: list[tuple[str, float | None]] = field(default_factory=list)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def reply(self) -> str:
        return f"$JS.ACK.{self.metadata.stream}.{self.metadata.consumer}"

    @property
    def outcome(self) -> str | None:
        """How the message was finally settled: ``ack``, ``nak`` or ``term`` (None: not yet)."""
        final = [action for action, _ in self.settled if action != "in_progress"]
        return final[-1] if final else None

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append(("nak", delay))

    async def term(self) -> None:
        self.settled.append(("term", None))

    async def in_progress(self) -> None:
        self.settled.append(("in_progress", None))
        self.progressed.set()

    def redelivered(self) -> FakeMsg:
        """The same stored message delivered once more (a fresh delivery, nothing settled)."""
        meta = dataclasses.replace(self.metadata, num_delivered=self.metadata.num_delivered + 1)
        return FakeMsg(self.subject, self.data, self.headers, meta)


def delivered(
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    *,
    attempt: int = 1,
    seq: int = 1,
    stream: str = Stream.EVENTS,
    consumer: str = "test-consumer",
    pending: int = 0,
) -> FakeMsg:
    """A message stored as ``seq`` in ``stream``, delivered for the ``attempt``-th time."""
    meta = Metadata(
        sequence=Metadata.SequencePair(consumer=seq, stream=seq),
        num_pending=pending,
        num_delivered=attempt,
        timestamp=datetime.datetime.now(datetime.UTC),
        stream=stream,
        consumer=consumer,
    )
    return FakeMsg(subject, data, dict(headers) if headers is not None else None, meta)


def resolving(table: dict[str, list[str]]) -> tuple[Callable[[str, int], list[str]], list[str]]:
    """A DNS resolver answering from ``table``, and the list of names it was asked for."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return table[host]

    return resolve, asked


def unloadable_wasm() -> bytes:
    """A valid Wasm module Extism cannot instantiate: it imports ("env", "nope")."""
    magic_version = b"\x00asm\x01\x00\x00\x00"
    # type section: one type, func () -> ()
    types = bytes([0x01, 0x04, 0x01, 0x60, 0x00, 0x00])
    # import section: one import, module "env", name "nope", kind func, type index 0
    body = bytes([0x01, 0x03]) + b"env" + bytes([0x04]) + b"nope" + bytes([0x00, 0x00])
    imports = bytes([0x02, len(body)]) + body
    return magic_version + types + imports


class FakeCoreSub:
    """A core subscription (a cold step's doorbell) whose unsubscribe does nothing."""

    async def unsubscribe(self, limit: int = 0) -> None:
        return None
