"""Consumer checks asked together are answered together, never from an earlier request.

A fake server answers the JetStream API requests (CONSUMER.LIST pages, CONSUMER.INFO)
from a table of consumers, and records what was asked and when: the checks must
list a stream when many of its consumers are asked about at once, ask singly when
few are, send every answer's request after its question, and answer "work waiting"
whenever they are unsure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import pytest

from deadlift.bus import checks as checks_module
from deadlift.bus.checks import ASKERS_PER_PAGE, LIST_PAGE, ConsumerChecks
from tests.conftest import eventually

API = "$JS.API"


@dataclass
class Reply:
    subject: str
    data: bytes


@dataclass
class FakeServer:
    """Consumers by stream and name, as (num_pending, num_ack_pending)."""

    consumers: dict[str, dict[str, tuple[int, int]]]
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: answer; clear: hold answers back
    fail: Callable[[str], dict[str, Any] | None] = lambda subject: None
    silent: bool = False  # never answer
    closed: bool = False
    inbox_count: int = 0
    _cb: Callable[[Reply], Awaitable[None]] | None = None

    # -- the nats-py Client surface the checks use --
    def new_inbox(self) -> str:
        self.inbox_count += 1
        return f"_INBOX.fake{self.inbox_count}"

    async def subscribe(self, subject: str, cb: Any = None, **_: Any) -> Any:
        self._cb = cb
        return self

    async def unsubscribe(self) -> None:
        self._cb = None

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        if self.closed:
            raise nats.errors.ConnectionClosedError
        body = json.loads(payload) if payload else {}
        self.requests.append((subject, body))
        # As the consumers are when the request comes; sent when no longer held back.
        answer = self.fail(subject) or self._api(subject, body)
        asyncio.get_running_loop().create_task(self._answer(answer, reply))

    async def _answer(self, answer: dict[str, Any], reply: str) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(0)
        if not self.silent and self._cb is not None:
            await self._cb(Reply(reply, json.dumps(answer).encode()))

    def _api(self, subject: str, body: dict[str, Any]) -> dict[str, Any]:
        parts = subject.removeprefix(f"{API}.").split(".")
        if parts[:2] == ["CONSUMER", "LIST"]:
            table = sorted(self.consumers.get(parts[2], {}).items())
            offset = body.get("offset", 0)
            page = table[offset : offset + LIST_PAGE]
            return {
                "total": len(table),
                "offset": offset,
                "limit": LIST_PAGE,
                "consumers": [info(name, *counts) for name, counts in page],
            }
        stream, name = parts[2], parts[3]
        counts = self.consumers.get(stream, {}).get(name)
        if counts is None:
            return {"error": {"code": 404, "err_code": 10014, "description": "consumer not found"}}
        return info(name, *counts)

    def asked(self, kind: str) -> list[str]:
        return [s for s, _ in self.requests if s.startswith(f"{API}.CONSUMER.{kind}.")]


def info(name: str, pending: int, ack_pending: int) -> dict[str, Any]:
    return {"name": name, "num_pending": pending, "num_ack_pending": ack_pending, "config": {}}


def stream_of(count: int, busy: set[int] = frozenset()) -> dict[str, tuple[int, int]]:  # type: ignore[assignment]
    return {f"c{i:05d}": ((1, 0) if i in busy else (0, 0)) for i in range(count)}


def checks_on(server: FakeServer, **kwargs: Any) -> ConsumerChecks:
    return ConsumerChecks(server, api_prefix=API, **kwargs)  # type: ignore[arg-type]


async def test_many_askers_of_a_stream_are_answered_by_one_listing() -> None:
    size = 3 * LIST_PAGE
    server = FakeServer({"S": stream_of(size, busy={7, 600})})
    checks = checks_on(server)
    checks.note_sizes({"S": size})
    names = list(server.consumers["S"])
    answers = await asyncio.gather(*(checks.has_work("S", n) for n in names))
    assert dict(zip(names, answers, strict=True)) == {n: n in ("c00007", "c00600") for n in names}
    assert len(server.asked("LIST")) == 3  # one request per page, for 768 askers
    assert server.asked("INFO") == []


async def test_a_few_askers_are_answered_one_request_each() -> None:
    server = FakeServer({"S": stream_of(3 * LIST_PAGE, busy={2})})
    checks = checks_on(server)
    checks.note_sizes({"S": 3 * LIST_PAGE})
    answers = await asyncio.gather(*(checks.has_work("S", f"c{i:05d}") for i in range(5)))
    assert answers == [False, False, True, False, False]
    assert server.asked("LIST") == []
    assert sorted(server.asked("INFO")) == [f"{API}.CONSUMER.INFO.S.c{i:05d}" for i in range(5)]


async def test_a_stream_not_worth_listing_to_the_end_is_finished_singly() -> None:
    """Unknown size: the first page tells it; too few askers left for the rest: singly."""
    size = 40 * LIST_PAGE
    server = FakeServer({"S": stream_of(size, busy={3, 9000})})
    checks = checks_on(server)
    # Askers on the first page and one far beyond it: not worth 39 more pages.
    names = [f"c{i:05d}" for i in range(ASKERS_PER_PAGE)] + ["c09000"]
    answers = await asyncio.gather(*(checks.has_work("S", n) for n in names))
    assert [n for n, work in zip(names, answers, strict=True) if work] == ["c00003", "c09000"]
    assert len(server.asked("LIST")) == 1
    assert server.asked("INFO") == [f"{API}.CONSUMER.INFO.S.c09000"]


async def test_an_asker_during_a_listing_is_answered_by_a_later_request() -> None:
    """The listing was sent before it asked: its consumer may have changed since."""
    size = LIST_PAGE
    hold = asyncio.Event()
    server = FakeServer({"S": stream_of(size)}, hold=hold)
    checks = checks_on(server)
    checks.note_sizes({"S": size})
    names = list(server.consumers["S"])
    first = asyncio.gather(*(checks.has_work("S", n) for n in names))
    await eventually(lambda: server.requests, message="the listing on its way")
    sent_before = len(server.requests)
    server.consumers["S"]["c00001"] = (1, 0)  # an event stored after the listing was sent
    late = asyncio.create_task(checks.has_work("S", "c00001"))
    await asyncio.sleep(0.02)
    hold.set()
    assert not any(await first)  # the listing's answer: as the consumers were
    assert await late is True  # from a request sent after it asked
    assert len(server.requests) > sent_before
    assert server.requests[-1][0] == f"{API}.CONSUMER.INFO.S.c00001"


async def test_a_consumer_missing_from_the_listing_has_work_waiting() -> None:
    size = LIST_PAGE
    server = FakeServer({"S": stream_of(size - 1)})
    checks = checks_on(server)
    checks.note_sizes({"S": size})
    names = [*server.consumers["S"], "gone"]
    answers = await asyncio.gather(*(checks.has_work("S", n) for n in names))
    assert answers[-1] is True and not any(answers[:-1])
    assert server.asked("INFO") == []


@pytest.mark.parametrize("trouble", ["listing error", "info error", "no answer", "closed"])
async def test_any_trouble_answers_work_waiting(
    trouble: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 2 * LIST_PAGE
    server = FakeServer({"S": stream_of(size)})
    error = {"error": {"code": 503, "description": "JetStream system temporarily unavailable"}}
    if trouble == "listing error":
        server.fail = lambda subject: error if ".LIST." in subject else None
        askers = size
    elif trouble == "info error":
        server.fail = lambda subject: error
        askers = 3
    elif trouble == "no answer":
        server.silent = True
        askers = 3
    else:
        server.closed = True
        askers = 3
    checks = checks_on(server, timeout=0.05)
    checks.note_sizes({"S": size})
    names = list(server.consumers["S"])[:askers]
    answers = await asyncio.wait_for(asyncio.gather(*(checks.has_work("S", n) for n in names)), 2.0)
    assert all(answers)


async def test_askers_of_the_same_consumer_share_an_answer_and_streams_are_apart() -> None:
    server = FakeServer({"A": stream_of(2, busy={1}), "B": stream_of(2)})
    checks = checks_on(server)
    answers = await asyncio.gather(
        checks.has_work("A", "c00001"),
        checks.has_work("A", "c00001"),
        checks.has_work("B", "c00001"),
    )
    assert answers == [True, True, False]
    assert sorted(server.asked("INFO")) == [
        f"{API}.CONSUMER.INFO.A.c00001",
        f"{API}.CONSUMER.INFO.B.c00001",
    ]


async def test_single_requests_are_bounded_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks_module, "IN_FLIGHT", 4)
    hold = asyncio.Event()
    server = FakeServer({"S": stream_of(10)}, hold=hold)
    checks = checks_on(server)
    checks.note_sizes({"S": 100 * LIST_PAGE})  # never worth listing
    asked = asyncio.gather(*(checks.has_work("S", f"c{i:05d}") for i in range(10)))
    await asyncio.sleep(0.02)
    assert len(server.requests) == 4
    hold.set()
    assert not any(await asked)
    assert len(server.requests) == 10
