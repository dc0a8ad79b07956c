"""What the benchmark scenarios share: the result record, the module, the backlog."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deadlift.runtime.worker import Worker
from deadlift.wire import events

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "workers" / "dist" / "add_ten.wasm"


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    events: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds else 0.0


def module_wasm() -> bytes:
    if not MODULE.is_file():
        raise FileNotFoundError(f"{MODULE} not found; run from a Deadlift checkout")
    return MODULE.read_bytes()


async def prefill(js: Any, subject: str, count: int) -> None:
    """Publish ``count`` Deadlift events, awaiting their PubAcks in windows."""
    window: list[Any] = []
    for n in range(count):
        event = events.new_event({"value": n}, source="bench", type="bench")
        headers, body = events.encode(event)
        headers[events.MSG_ID] = event.id
        window.append(await js.publish_async(subject, body, headers=headers))
        if len(window) >= 2000:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(0.005)


async def done(worker: Worker, total: int) -> bool:
    return worker.stats["ok"] >= total
