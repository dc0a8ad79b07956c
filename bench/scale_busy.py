"""``scale.py``'s busy-workflow phase: one workflow's throughput while the others idle.

Issue 15 asks that one busy workflow among N-1 idle ones keeps at least 80 % of
what the same workflow does alone (N = 1). ``BUSY`` events are published to
``w0`` as fast as their PubAcks allow, 100 in flight; the rate is the events
over the time from the first publish to the last output's arrival (the worker
drains while the backlog is published, as it does for a burst in production).
The same method at every N, so the ratio compares like with like.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

BUSY = 5_000
IN_FLIGHT = 100


class Arrivals(Protocol):
    arrived: dict[str, float]

    async def wait(self, ids: list[str], timeout: float) -> None: ...


async def busy_rate(
    publish: Callable[[str, str], Awaitable[None]],
    outputs: Arrivals,
    events: int = BUSY,
    timeout: float = 300.0,
) -> tuple[float | None, int]:
    """Events per second through ``w0`` (None if any is missing), and how many were lost."""
    ids = [f"busy-{k}" for k in range(events)]
    began = time.monotonic()
    for first in range(0, events, IN_FLIGHT):
        await asyncio.gather(*(publish("bench.w0.in", i) for i in ids[first : first + IN_FLIGHT]))
    await outputs.wait(ids, timeout)
    lost = sum(i not in outputs.arrived for i in ids)
    if lost:
        return None, lost
    return events / (max(outputs.arrived[i] for i in ids) - began), 0
