"""Flushes asked together share one PING, and each caller's PING is sent after it asked."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import nats.errors
import pytest

from deadlift.bus.flushes import Flushes


class SlowPongs:
    """A connection whose PONGs come when the test says (each flush: one PING)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.pings: list[asyncio.Event] = []
        self.error = error
        self.pinged = asyncio.Event()

    async def ping(self, n: int) -> asyncio.Event:
        """The ``n``-th PING's PONG (0-based), once it was sent."""
        while len(self.pings) <= n:
            self.pinged.clear()
            await self.pinged.wait()
        return self.pings[n]

    async def flush(self, timeout: float = 2) -> None:
        pong = asyncio.Event()
        self.pings.append(pong)
        self.pinged.set()
        try:
            await asyncio.wait_for(pong.wait(), timeout)
        except TimeoutError:
            raise nats.errors.TimeoutError from None
        if self.error is not None:
            raise self.error


async def test_flushes_asked_together_share_one_ping() -> None:
    nc = SlowPongs()
    flushes = Flushes(cast(Any, nc))
    waiting = [asyncio.create_task(flushes.flush(timeout=1)) for _ in range(100)]
    (await nc.ping(0)).set()
    await asyncio.gather(*waiting)
    assert len(nc.pings) == 1


async def test_a_flush_asked_while_one_is_on_its_way_waits_for_a_later_ping() -> None:
    # The PING on its way may have left before what this caller waits for.
    nc = SlowPongs()
    flushes = Flushes(cast(Any, nc))
    first = asyncio.create_task(flushes.flush(timeout=1))
    await nc.ping(0)
    second = asyncio.create_task(flushes.flush(timeout=1))
    nc.pings[0].set()
    await first
    await asyncio.sleep(0.01)
    assert not second.done()
    assert len(nc.pings) == 2
    nc.pings[1].set()
    await second


async def test_a_failed_flush_fails_every_caller_sharing_it() -> None:
    nc = SlowPongs(error=nats.errors.ConnectionClosedError())
    flushes = Flushes(cast(Any, nc))
    waiting = [asyncio.create_task(flushes.flush(timeout=1)) for _ in range(3)]
    (await nc.ping(0)).set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, nats.errors.ConnectionClosedError) for r in results)


async def test_a_flush_never_answered_times_out() -> None:
    flushes = Flushes(cast(Any, SlowPongs()))
    with pytest.raises(nats.errors.TimeoutError):
        await flushes.flush(timeout=0.05)


async def test_a_caller_cancelled_leaves_the_others_their_answer() -> None:
    nc = SlowPongs()
    flushes = Flushes(cast(Any, nc))
    waiting = [asyncio.create_task(flushes.flush(timeout=1)) for _ in range(10)]
    pong = await nc.ping(0)
    for task in waiting[:5]:
        task.cancel()
    pong.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[:5])
    assert results[5:] == [None] * 5


def test_each_connection_has_its_own() -> None:
    a, b = SlowPongs(), SlowPongs()
    assert Flushes.of(cast(Any, a)) is Flushes.of(cast(Any, a))
    assert Flushes.of(cast(Any, a)) is not Flushes.of(cast(Any, b))
