"""Flushes of one connection asked together: one PING answers them all.

A stopping step flushes (PING/PONG) before taking what the server delivered to
it: the PONG comes after everything the server sent before it. A worker stopping
10,000 workflows asked 60,000 flushes at once; their PONGs outran the flushes'
timeout and the shutdown its deadline. A PING sent after a caller asked serves
that caller as well as its own would, so callers asking within
:data:`WINDOW_S` of each other share one.
"""

from __future__ import annotations

import asyncio
import weakref

from nats.aio.client import Client

WINDOW_S = 0.002  # how long a flush waits for others to join it


class Flushes:
    """The shared flushes of one connection (:meth:`of`)."""

    _by_connection: weakref.WeakKeyDictionary[Client, Flushes] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Client, window_s: float = WINDOW_S) -> None:
        self.nc = nc
        self.window_s = window_s
        self._next: list[asyncio.Future[None]] | None = None  # callers of the PING not sent yet

    @classmethod
    def of(cls, nc: Client) -> Flushes:
        """The flushes of ``nc`` (made on first use)."""
        flushes = cls._by_connection.get(nc)
        if flushes is None:
            flushes = cls._by_connection[nc] = cls(nc)
        return flushes

    async def flush(self, timeout: float) -> None:
        """Return once the server answered a PING sent after this call.

        Raises what ``Client.flush`` raises (e.g. ``nats.errors.TimeoutError`` after
        ``timeout`` seconds).
        """
        loop = asyncio.get_running_loop()
        callers = self._next
        if callers is None:
            callers = self._next = []
            loop.call_later(self.window_s, self._send, callers, timeout)
        # A future of its own, not a shield around a shared one: a caller cancelled
        # is then skipped in O(1) (a shield's cancel scans the shared callbacks:
        # quadratic with thousands of steps stopping at once, measured).
        mine: asyncio.Future[None] = loop.create_future()
        callers.append(mine)
        await mine

    def _send(self, callers: list[asyncio.Future[None]], timeout: float) -> None:
        self._next = None  # who asks from now on needs a later PING

        def answered(flush: asyncio.Future[None]) -> None:
            failure = None if flush.cancelled() else flush.exception()
            for caller in callers:
                if caller.done():
                    continue  # cancelled meanwhile
                if flush.cancelled():
                    caller.cancel()
                elif failure is not None:
                    caller.set_exception(failure)
                else:
                    caller.set_result(None)

        # nats-py types the timeout int; it is asyncio.wait_for's, any number.
        flush = self.nc.flush(timeout=timeout)  # type: ignore[arg-type]
        asyncio.ensure_future(flush).add_done_callback(answered)
