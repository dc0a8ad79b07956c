"""Pulling from a durable JetStream consumer: one request, one wait, per batch.

nats-py's ``fetch`` waits for every message of a batch with ``next_msg``, which
creates a task, a ``wait_for`` and a ``uuid4`` (an ``os.urandom`` syscall) per
message: 15 % of a worker's event-loop time while 1,000 workflows started, and
a cost on every event after. Here a batch is one pull request (``batch``,
``expires``) and one deadline: the messages the server sends are taken from the
subscription's queue as they come, until the batch is full or the server ends
the request (a 408 status when it expires; a 409 on trouble).
"""

from __future__ import annotations

import asyncio
import json
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("deadlift.bus")

STATUS = "Status"
REQUEST_ENDED = {"404", "408"}  # no messages / the request expired: fewer than asked
HEARTBEAT = "100"
GRACE_S = 0.5  # past the request's expiry: the server's 408 is late (or lost with it)


class Pull:
    """Fetches batches from one durable consumer over one inbox subscription."""

    def __init__(self, nc: Client, stream: str, consumer: str, api_prefix: str = "$JS.API"):
        self.nc = nc
        self.consumer = consumer
        self.subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._queue: asyncio.Queue[Msg] | None = None

    async def start(self) -> None:
        """Subscribe to the inbox the consumer delivers to (the first fetch does it anyway:
        a step that never pulls, idle since it started, costs the server no subscription)."""
        if self._sub is not None:
            return
        # Unbounded: what arrives is what this runner asked for, a batch at a time.
        self._sub = await self.nc.subscribe(self.inbox, pending_msgs_limit=0, pending_bytes_limit=0)
        self._queue = self._sub._pending_queue  # nats-py's queue: no task per message

    @property
    def subscribed(self) -> bool:
        """Whether the inbox is subscribed: else nothing was ever delivered to it."""
        return self._sub is not None

    async def fetch(self, batch: int, timeout: float, *, no_wait: bool = False) -> list[Msg]:
        """Up to ``batch`` events, waiting at most ``timeout`` seconds for them.

        ``no_wait``: only those stored now (the server answers at once: 404 when it
        has fewer), as a step with a backlog asks; ``timeout`` then bounds the answer.

        Raises:
            TimeoutError: none came.
            nats.js.errors.APIError: the server refused the request (e.g. the
                consumer is gone).
        """
        if self._queue is None:
            await self.start()  # sent before the request: the server knows where to deliver
        assert self._queue is not None
        msgs = self.delivered()  # a late answer to an earlier request first
        wanted = batch - len(msgs)
        if wanted <= 0:
            return msgs
        # The server ignores no_wait in a request with expires.
        request = (
            {"batch": wanted, "no_wait": True}
            if no_wait
            else {"batch": wanted, "expires": int(timeout * 1e9)}
        )
        await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self.inbox)
        queue = self._queue
        try:
            async with asyncio.timeout(timeout + GRACE_S):
                while len(msgs) < batch:
                    msg = await queue.get()  # no suspension while messages are queued
                    status = msg.headers.get(STATUS) if msg.headers else None
                    if status is None:
                        msgs.append(msg)
                    elif status in REQUEST_ENDED:
                        break
                    elif status != HEARTBEAT:
                        if msgs:  # what came is ours: run it, report next time
                            break
                        raise nats.js.errors.APIError.from_msg(msg)
        except TimeoutError:
            if self.nc.is_closed:
                raise nats.errors.ConnectionClosedError from None
        if not msgs:
            raise TimeoutError
        return msgs

    def delivered(self) -> list[Msg]:
        """The events waiting in the inbox, taken from it (status messages dropped)."""
        found: list[Msg] = []
        queue = self._queue
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if not (msg.headers and STATUS in msg.headers):
                found.append(msg)
        return found

    async def stop(self) -> None:
        """Unsubscribe (events delivered and not taken are redelivered after ack_wait)."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing %s: %s", self.consumer, exc)
