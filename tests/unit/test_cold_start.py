"""How a step starts: straight to its doorbell when its consumer had no events when bound.

A worker starting thousands of steps lists their consumers once; a step whose
consumer showed nothing waiting skips the batch fetch it would start with, and
goes cold. Safe only because its check is asked after its doorbell is armed: an
event stored between the listing and the subscription shows there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors

from deadlift.bus.checks import LIST_PAGE, ConsumerChecks
from deadlift.bus.streams import StepBinding
from deadlift.runtime.pulling import Puller
from deadlift.settings import Settings
from tests.conftest import eventually
from tests.unit.fakes import FakeCoreSub
from tests.unit.test_consumer_checks import API, FakeServer, stream_of


class Log(list[str]):
    pass


class FakePull:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def fetch(self, batch: int, timeout: float, *, no_wait: bool = False) -> list[Any]:
        self.log.append("fetch no_wait" if no_wait else "fetch")
        await asyncio.sleep(min(timeout, 0.01))
        raise nats.errors.TimeoutError


class FakeNats:
    def __init__(self, log: Log) -> None:
        self.log = log

    async def subscribe(self, subject: str, **_: Any) -> FakeCoreSub:
        self.log.append(f"subscribe {subject}")
        return FakeCoreSub()


class FakeChecks:
    def __init__(self, log: Log, work: bool = False) -> None:
        self.log = log
        self.work = work

    async def has_work(self, stream: str, consumer: str, *, absent: bool = True) -> bool:
        self.log.append(f"check {stream} {consumer}")
        return self.work


def puller(log: Log, waiting: int | None, *, work: bool = False) -> Puller:
    settings = Settings(idle_cold_s=5, idle_pull_s=0.05, cold_recheck_s=600)
    binding = StepBinding("S", "c", filters=("acme.a",), waiting=waiting)
    return Puller(
        FakePull(log),  # type: ignore[arg-type]
        FakeNats(log),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        binding,
        settings,
        batch=8,
        checks=FakeChecks(log, work),
    )


async def first_moves(p: Puller, log: Log, count: int) -> list[str]:
    """What the step did first: its first ``count`` moves (then it is told to stop)."""
    stopped = asyncio.Event()

    async def pull() -> None:
        while not stopped.is_set():
            await p.next()

    task = asyncio.create_task(pull())
    try:
        await eventually(lambda: len(log) >= count, timeout=3.0, message=f"{count} moves")
    finally:
        stopped.set()
        p.stop()
        await asyncio.wait_for(task, 2.0)
    return log[:count]


async def test_a_step_whose_consumer_was_idle_goes_cold_without_a_fetch() -> None:
    log = Log()
    assert await first_moves(puller(log, waiting=0), log, 2) == [
        "subscribe acme.a",  # the doorbell first
        "check S c",  # then, a moment later, the check: its request is sent after arming
    ]


async def test_a_step_whose_consumer_had_events_starts_with_a_batch_fetch() -> None:
    """Pending, or held by another worker (awaiting its ack): as before, a fetch first."""
    log = Log()
    assert (await first_moves(puller(log, waiting=3), log, 1)) == ["fetch no_wait"]


async def test_a_step_bound_without_knowing_starts_with_a_batch_fetch() -> None:
    log = Log()
    assert (await first_moves(puller(log, waiting=None), log, 1)) == ["fetch no_wait"]


async def test_an_event_stored_before_the_doorbell_rang_nothing_is_pulled_at_once() -> None:
    """The check finds what the listing did not show: the step leaves cold and pulls."""
    log = Log()
    moves = await first_moves(puller(log, waiting=0, work=True), log, 3)
    assert moves == ["subscribe acme.a", "check S c", "fetch"]


class RingingNats(FakeNats):
    """Subscriptions whose doorbell futures the test can ring (an event on the subject)."""

    def __init__(self, log: Log) -> None:
        super().__init__(log)
        self.futures: dict[str, Any] = {}

    async def subscribe(self, subject: str, **options: Any) -> FakeCoreSub:
        self.futures[subject] = options.get("future")
        return await super().subscribe(subject)


async def test_a_recheck_checks_again_and_stays_cold_unless_an_event_rang() -> None:
    """After a reconnect: a check, not a pull, for a step with nothing to do."""
    log = Log()
    nc = RingingNats(log)
    p = puller(log, waiting=0)
    p.nc = nc  # type: ignore[assignment]
    p.recheck_s = 600
    task = asyncio.create_task(_pull_until_stopped(p))
    try:
        await eventually(lambda: p.cold, timeout=3.0, message="cold")
        assert log == ["subscribe acme.a", "check S c"]
        p.recheck()
        await eventually(lambda: len(log) == 3, timeout=3.0, message="a check again")
        assert log[2] == "check S c"
        await asyncio.sleep(0.05)
        assert "fetch" not in log  # still cold: no pull
        nc.futures["acme.a"].set_result(object())  # an event rings
        await eventually(lambda: "fetch" in log, timeout=3.0, message="a pull after a ring")
    finally:
        p.stop()
        task.cancel()


async def _pull_until_stopped(p: Puller) -> None:
    while not p._stopped:
        await p.next()


async def test_cold_steps_rechecking_together_are_answered_by_one_listing() -> None:
    """A reconnect makes every cold step check at once: a listing, not a request each."""
    count = 2 * LIST_PAGE
    server = FakeServer({"S": stream_of(count)})
    checks = ConsumerChecks(server, api_prefix=API)  # type: ignore[arg-type]
    checks.note_sizes({"S": count})
    log = Log()
    settings = Settings(idle_cold_s=5, idle_pull_s=0.05, cold_recheck_s=600)
    pullers = [
        Puller(
            FakePull(log),  # type: ignore[arg-type]
            FakeNats(log),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            StepBinding("S", f"c{i:05d}", filters=(f"s.{i}",), waiting=0),
            settings,
            batch=8,
            checks=checks,
        )
        for i in range(count)
    ]
    tasks = [asyncio.create_task(_pull_until_stopped(p)) for p in pullers]
    try:
        await eventually(lambda: all(p.cold for p in pullers), timeout=5.0, message="all cold")
        server.requests.clear()
        for p in pullers:
            p.recheck()
        await eventually(lambda: len(server.requests) == 2, timeout=3.0, message="2 pages")
        await asyncio.sleep(0.05)
        assert server.asked("LIST") == [f"{API}.CONSUMER.LIST.S"] * 2
        assert server.asked("INFO") == []
        assert not [move for move in log if move.startswith("fetch")]  # all stayed cold
    finally:
        for p in pullers:
            p.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 3.0)
