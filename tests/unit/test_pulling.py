"""The puller's modes without a server: when a step may go cold, and when it must not."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import nats.errors

from deadlift.bus.streams import StepBinding
from deadlift.runtime.pulling import SETTLE_S, Puller
from deadlift.settings import Settings
from tests.unit.fakes import FakeCoreSub


@dataclass
class Info:
    num_pending: int = 0
    num_ack_pending: int = 0


class FakeSub:
    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float, *, no_wait: bool = False) -> list[Any]:
        self.fetches += 1
        await asyncio.sleep(min(timeout, 0.01))
        raise nats.errors.TimeoutError


class FakeNats:
    """Subscriptions that never ring; ``denied`` as the worker's client reports it."""

    def __init__(self, denied: str | None = None) -> None:
        self.subscribed: list[str] = []
        self._denied = denied

    async def subscribe(self, subject: str, **_: Any) -> FakeCoreSub:
        self.subscribed.append(subject)
        return FakeCoreSub()

    def denied(self, subject: str) -> str | None:
        return self._denied


class FakeJs:
    def __init__(self, info: Info) -> None:
        self.info = info
        self.asked = 0

    async def consumer_info(self, stream: str, consumer: str) -> Info:
        self.asked += 1
        return self.info


def puller(nc: FakeNats, js: FakeJs) -> Puller:
    settings = Settings(idle_cold_s=0.01, idle_pull_s=0.01, cold_recheck_s=0.05)
    binding = StepBinding("S", "c", filters=("acme.a", "acme.b"))
    return Puller(FakeSub(), nc, js, binding, settings, batch=8)  # type: ignore[arg-type]


async def pulls_until(p: Puller, seconds: float) -> None:
    with_deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < with_deadline:
        await p.next()


async def test_an_idle_step_goes_cold_on_every_subject_of_its_consumer() -> None:
    nc, js = FakeNats(), FakeJs(Info())
    p = puller(nc, js)
    task = asyncio.create_task(pulls_until(p, 10))
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if p.cold:
                break
        assert p.cold and p.waiting
        assert nc.subscribed[:2] == ["acme.a", "acme.b"]
    finally:
        task.cancel()


async def test_a_step_with_events_held_elsewhere_stays_warm() -> None:
    nc, js = FakeNats(), FakeJs(Info(num_ack_pending=1))
    p = puller(nc, js)
    await pulls_until(p, SETTLE_S + 0.5)  # its one check comes after the moment
    assert not p.cold
    assert p.pull.fetches > 3  # still long-polling: the held events come back without a ring


async def test_a_step_that_may_not_subscribe_never_goes_cold() -> None:
    nc, js = FakeNats(denied="permissions violation for subscription to acme.a"), FakeJs(Info())
    p = puller(nc, js)
    await pulls_until(p, 0.5)
    assert not p.cold
    assert p.cold_after_s == 0.0
    assert p.pull.fetches > 3


async def test_a_cold_step_told_to_stop_returns_without_being_cancelled() -> None:
    """A worker's shutdown: the cancel of a cold wait can be swallowed (Python 3.11's
    wait_for inside nats-py's subscribe), and the step then slept out its recheck
    (600 s by default) while the shutdown waited its whole timeout."""
    nc, js = FakeNats(), FakeJs(Info())
    p = Puller(
        FakeSub(),  # type: ignore[arg-type]
        nc,  # type: ignore[arg-type]
        js,  # type: ignore[arg-type]
        StepBinding("S", "c", filters=("acme.a",)),
        Settings(idle_cold_s=0.01, idle_pull_s=0.01, cold_recheck_s=600),
        batch=8,
    )
    await p.next()  # the backlog check: none
    task = asyncio.create_task(p.next())
    for _ in range(300):
        await asyncio.sleep(0.01)
        if p.cold:
            break
    assert p.cold
    p.stop()
    assert await asyncio.wait_for(task, 1) == []
    assert await asyncio.wait_for(p.next(), 1) == []  # stopped: no more pulls
