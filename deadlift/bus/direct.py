"""Publishes and acks written to the connection directly, below nats-py's per-message API.

``js.publish_async`` costs a step more than its module call: per message it
serialises every header again, draws random bytes for the reply token, waits on
a semaphore through ``wait_for`` and adds a done callback. :class:`AsyncPublishes`
writes the ``HPUB`` command itself, from a header block rendered by the caller
(see :mod:`deadlift.wire.headers`), with a counter for the reply token; the
PubAcks arrive on one wildcard inbox and resolve the futures, as nats-py's do.
:func:`ack` acks a delivered message the same way. Everything nats-py checks
before it writes is checked here too, with the same errors, and the bytes are
the ones it would write.

This relies on nats-py's connection internals (``_send_command``, the flusher
queue): :func:`supported` says whether they are there; callers fall back to
nats-py's own methods if not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import PubAck

_INTERNALS = (
    "_send_command",
    "_flush_queue",
    "_flush_pending",
    "_max_payload",
    "_max_pending_size",
    "_pending_data_size",
    "_skip_subject_validation",
)
_INVALID_SUBJECT = re.compile(r"[ \t\r\n]")  # nats-py's publish-side subject check
_NO_RESPONDERS = "503"
_PLAIN_ACK = frozenset({"stream", "seq", "domain", "duplicate", "val"})
_STALL_CHECK_S = 0.5


def supported(nc: Client) -> bool:
    """Whether the connection has the nats-py internals this module writes through."""
    return all(hasattr(nc, name) for name in _INTERNALS)


def _check(nc: Any, subject: str, size: int) -> None:
    """What nats-py's ``Client.publish`` refuses, refused the same way."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
    ):
        raise nats.errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise nats.errors.MaxPayloadError
    if not nc._skip_subject_validation and (not subject or _INVALID_SUBJECT.search(subject)):
        raise nats.errors.BadSubjectError


async def _write(nc: Any, command: bytes, size: int) -> None:
    """Queue a command as nats-py's publish does, and kick its flusher."""
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


async def ack(msg: Msg) -> None:
    """``await msg.ack()``, written directly when the connection allows it.

    Raises:
        nats.errors.Error: what ``msg.ack()`` raises (not a JetStream message,
            acked already, connection closed…).
    """
    nc: Any = getattr(msg, "_client", None)
    if type(msg) is not Msg or nc is None or not supported(nc):
        await msg.ack()
        return
    msg._check_reply()
    reply = msg.reply
    _check(nc, reply, 0)
    await _write(nc, b"PUB %b  0\r\n\r\n" % reply.encode(), 0)
    msg._ackd = True


class AsyncPublishes:
    """JetStream publishes on one connection whose PubAcks arrive on futures.

    At most ``max_pending`` wait for their PubAck at once (nats-py's default); a
    publish beyond waits for room, as ``js.publish_async`` does.
    """

    def __init__(self, nc: Client, *, max_pending: int = 4000) -> None:
        self.nc = nc
        self.max_pending = max_pending
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._prefix = b""
        self._skip = 0
        self._next = 0
        self._started: asyncio.Future[None] | None = None
        self._room = asyncio.Event()

    async def publish(
        self, subject: str, header_block: bytes, payload: bytes
    ) -> asyncio.Future[PubAck]:
        """Write one publish with a rendered header block; its PubAck arrives on the future.

        Raises:
            nats.errors.Error: what nats-py's publish raises (connection closed or
                draining, outbound buffer full, payload over max_payload, bad subject).
        """
        if self._started is None or not self._started.done():
            await self._start()
        _check(self.nc, subject, len(payload))
        if len(self._pending) >= self.max_pending:
            await self._wait_for_room()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        head = len(header_block)
        reply = self._prefix + token.encode()
        await _write(
            self.nc,
            b"HPUB %b %b %d %d\r\n%b%b\r\n"
            % (subject.encode(), reply, head, head + len(payload), header_block, payload),
            len(payload),
        )
        return future

    @property
    def pending(self) -> int:
        """Publishes waiting for their PubAck."""
        return len(self._pending)

    async def _start(self) -> None:
        # One subscription for every reply; concurrent first publishes share its start.
        if self._started is not None:
            await asyncio.shield(self._started)
            return
        self._started = asyncio.get_running_loop().create_future()
        try:
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self._on_reply)
        except BaseException as exc:
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: a later publish raises it again
            self._started = None
            raise
        self._prefix, self._skip = prefix.encode(), len(prefix)
        self._started.set_result(None)

    async def _wait_for_room(self) -> None:
        while len(self._pending) >= self.max_pending:
            # Futures the caller gave up on (cancelled: no PubAck in time) take no room.
            self._pending = {t: f for t, f in self._pending.items() if not f.done()}
            if len(self._pending) < self.max_pending:
                return
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), _STALL_CHECK_S)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[self._skip :], None)
        if not self._room.is_set() and len(self._pending) < self.max_pending:
            self._room.set()
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            response = json.loads(msg.data)
            if "error" in response:
                future.set_exception(nats.js.errors.APIError.from_error(response["error"]))
            elif response.keys() <= _PLAIN_ACK:
                future.set_result(PubAck(**response))
            else:
                future.set_result(PubAck.from_response(response))
        except Exception as exc:  # not a PubAck: the publish is not known to be stored
            future.set_exception(exc)
