"""Durable publishing: one way to put an event on a stream, used by steps, emits, DLQ and CLI.

A :class:`Publisher` checks what the server would refuse (nats-py closes the
whole connection over ``max_payload``), sets the ``Nats-Msg-Id`` the stream
de-duplicates on, and turns NATS errors into Deadlift's. :class:`MemoryPublisher`
records instead, for tests that need no server.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import PubAck

from deadlift.bus import direct
from deadlift.bus.connection import DeadliftClient
from deadlift.errors import DeadliftError, PayloadTooLargeError
from deadlift.model import names
from deadlift.wire import headers as wire_headers

MSG_ID = "Nats-Msg-Id"


class Publisher(Protocol):
    """Puts messages on streams durably."""

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (0: unknown)."""
        ...

    async def publish(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str | None = None
    ) -> PubAck:
        """Publish and wait for the stream's PubAck; validate the subject and headers first."""
        ...

    async def publish_async(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str
    ) -> asyncio.Future[PubAck]:
        """Start a publish whose subject was validated before (a step's targets at apply);
        await the returned future for the PubAck."""
        ...


@runtime_checkable
class Sender(Protocol):
    """Sends a message no stream acknowledges: a core NATS publish, fire and forget.

    For what crosses accounts through a stream export (run records): no PubAck
    comes back across accounts.
    """

    async def send(self, subject: str, body: bytes) -> None:
        """Hand the message to the connection; raise if it cannot take it."""
        ...


def check_size(max_payload: int, subject: str, headers: Mapping[str, str], body: bytes) -> None:
    """Refuse a message the server would reject: nats-py closes the whole connection then.

    Raises:
        PayloadTooLargeError: naming the subject, the size and the limit.
    """
    size = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12
    _check_total(max_payload, subject, size)


def _check_total(max_payload: int, subject: str, size: int) -> None:
    if max_payload and size > max_payload:
        raise PayloadTooLargeError(
            f"message for {subject} is {size} bytes, over the server's max_payload of "
            f"{max_payload}; send a reference (e.g. an object store key) instead of the data"
        )


def _with_id(headers: Mapping[str, str], msg_id: str | None) -> dict[str, str]:
    merged = dict(headers)
    if msg_id is not None:
        merged[MSG_ID] = msg_id
    return merged


class Stamping(ABC):
    """A publisher that forwards to ``publisher``, adding headers of its own (:meth:`stamp`)."""

    __slots__ = ()
    publisher: Publisher

    @abstractmethod
    def stamp(self, subject: str, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The headers to publish on ``subject`` with."""

    @property
    def max_payload(self) -> int:
        """The wrapped publisher's."""
        return self.publisher.max_payload

    async def publish(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str | None = None
    ) -> PubAck:
        """Publish with the stamped headers."""
        return await self.publisher.publish(
            subject, body, self.stamp(subject, headers), msg_id=msg_id
        )

    async def publish_async(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str
    ) -> asyncio.Future[PubAck]:
        """Start a publish with the stamped headers."""
        return await self.publisher.publish_async(
            subject, body, self.stamp(subject, headers), msg_id=msg_id
        )


class JetStreamPublisher:
    """Publishes through a connection's JetStream context."""

    def __init__(self, nc: Client, *, timeout: float = 5.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.timeout = timeout
        # publish_async writes below nats-py's publish when its internals are there.
        self._async = direct.AsyncPublishes(nc) if direct.supported(nc) else None

    @property
    def max_payload(self) -> int:
        """The server's ``max_payload``."""
        return int(self.nc.max_payload or 0)

    async def publish(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str | None = None
    ) -> PubAck:
        """Publish durably (awaiting the PubAck), refusing bad input before nats-py sees it.

        Raises:
            ConfigError: the subject is not one a message can be published to (a
                newline would corrupt the protocol; an over-long subject makes the
                server drop the connection) or a header would break the header block.
            PayloadTooLargeError: over the server's max_payload.
            PermissionDeniedError: the server refused the subject.
            DeadliftError: no stream captures the subject, or no answer in time.
        """
        names.check_subject(subject, field="subject", wildcards=False)
        message_headers = _with_id(headers, msg_id)
        names.check_headers(message_headers)
        check_size(self.max_payload, subject, message_headers, body)
        try:
            return await self.js.publish(
                subject, body, headers=message_headers, timeout=self.timeout
            )
        except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError, TimeoutError):
            if isinstance(self.nc, DeadliftClient):
                await self.nc.check_allowed(subject)
            raise DeadliftError(
                f"no stream captures {subject} (or the server did not answer in "
                f"{self.timeout:.0f} s); apply a workflow that triggers on or publishes to it"
            ) from None

    async def publish_async(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str
    ) -> asyncio.Future[PubAck]:
        """Start a publish (size checked); the PubAck arrives on the returned future.

        The header block is rendered here (its fixed part only once, for
        :class:`~deadlift.wire.headers.Headers`), byte for byte what nats-py sends.
        """
        if self._async is not None:
            if isinstance(headers, wire_headers.Headers):
                block = headers.render(MSG_ID, msg_id)
            else:
                block = wire_headers.render({**headers, MSG_ID: msg_id})
            _check_total(self.max_payload, subject, len(block) + len(body))
            return await self._async.publish(subject, block, body)
        message_headers = {**headers, MSG_ID: msg_id}
        check_size(self.max_payload, subject, message_headers, body)
        future: asyncio.Future[PubAck] = await self.js.publish_async(
            subject, body, headers=message_headers
        )
        return future

    async def send(self, subject: str, body: bytes) -> None:
        """A core publish (no PubAck), size-checked: the subject is the caller's own."""
        check_size(self.max_payload, subject, {}, body)
        await self.nc.publish(subject, body)


@dataclass(frozen=True, slots=True)
class Published:
    """One message a :class:`MemoryPublisher` took."""

    subject: str
    body: bytes
    headers: Mapping[str, str]


@dataclass
class MemoryPublisher:
    """Records what is published, de-duplicating on ``Nats-Msg-Id`` like a stream does."""

    max_payload: int = 1024 * 1024
    messages: list[Published] = field(default_factory=list)
    fail_with: Exception | None = None  # raise this on the next publishes (an outage)
    sent: list[Published] = field(default_factory=list)  # core publishes (no stream)
    _ids: set[str] = field(default_factory=set)

    def on(self, subject: str) -> list[Published]:
        """What was stored on ``subject``, in order."""
        return [m for m in self.messages if m.subject == subject]

    async def publish(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str | None = None
    ) -> PubAck:
        """Record the message (validated and size-checked as the real one does)."""
        names.check_subject(subject, field="subject", wildcards=False)
        message_headers = _with_id(headers, msg_id)
        names.check_headers(message_headers)
        check_size(self.max_payload, subject, message_headers, body)
        return self._store(subject, body, message_headers)

    async def publish_async(
        self, subject: str, body: bytes, headers: Mapping[str, str], *, msg_id: str
    ) -> asyncio.Future[PubAck]:
        """Record the message; the returned future is already done."""
        message_headers = {**headers, MSG_ID: msg_id}
        check_size(self.max_payload, subject, message_headers, body)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self._store(subject, body, message_headers))
        except Exception as exc:  # as a real publish reports an outage: on the future
            future.set_exception(exc)
        return future

    async def send(self, subject: str, body: bytes) -> None:
        """Record a core publish in :attr:`sent` (``fail_with`` applies too)."""
        check_size(self.max_payload, subject, {}, body)
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(Published(subject, body, {}))

    def _store(self, subject: str, body: bytes, headers: Mapping[str, str]) -> PubAck:
        if self.fail_with is not None:
            raise self.fail_with
        msg_id = headers.get(MSG_ID)
        duplicate = msg_id is not None and msg_id in self._ids
        if not duplicate:
            if msg_id is not None:
                self._ids.add(msg_id)
            self.messages.append(Published(subject, body, dict(headers)))
        return PubAck(stream="memory", seq=len(self.messages), duplicate=duplicate or None)
