"""Whether durable consumers have work: many steps' questions, answered together.

A cold step (see :mod:`deadlift.runtime.pulling`) asks whether its consumer has
events to deliver or delivered ones not yet acked. Thousands of steps ask at
once after a reconnect, or when their safety nets come due together; asked one
by one, each question is a JetStream API request the server and the worker's
event loop both pay for. Here the questions asked within :data:`WINDOW_S` are
answered together: for a stream with many askers, one ``CONSUMER.LIST`` listing
(a request per :data:`LIST_PAGE` consumers, each answering every asker on it);
for a few, a ``CONSUMER.INFO`` each. Every request is sent after every question
it answers was asked: a step relies on an answer only if it describes the
consumer after the step's own preparation (its doorbell) took effect. A question
asked while a batch is being answered waits for the next batch.

Any doubt answers "work waiting", the safe answer (the step pulls): an error, a
timeout, a consumer missing from its stream's listing.

Steps going cold one after another, as thousands do while a worker starts, ask
too far apart for a listing to pay (a quarter of a stream's consumers within one
batch): they are asked singly, each request cheaper than nats-py's.

The requests skip nats-py's request machinery (a ``wait_for``, an ``os.urandom``
and a dataclass tree per answer): answers come to one inbox subscription per
connection, and only the two counts are read from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import weakref
from collections import Counter
from collections.abc import Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from deadlift.bus.streams import CONSUMER_NOT_FOUND, LIST_PAGE, STREAM_NOT_FOUND

log = logging.getLogger("deadlift.bus")

WINDOW_S = 0.005  # questions asked within it share one batch of requests
ASKERS_PER_PAGE = 64
"""A stream is listed only while its pages still to come answer this many askers each.

Measured on this 2-core machine (3,000 consumers, worker and server CPU together):
~45 µs per consumer listed, ~150 µs per ``CONSUMER.INFO`` (each answer is the
consumer's whole state, encoded, sent and parsed): a page pays off from ~75 askers.
"""
IN_FLIGHT = 256  # single requests outstanding at once (the server queues its API requests)


class ConsumerChecks:
    """Answers "does consumer C of stream S have work?" for every step of a connection.

    Use :meth:`of` to get the one of a connection (all its steps share it).

    Args:
        nc: the connection.
        api_prefix: the JetStream API's subject prefix (``$JS.API`` unless a domain).
        timeout: seconds to wait for an answer (then: work waiting).
        window_s: questions asked within this many seconds are answered together.
    """

    _by_connection: weakref.WeakKeyDictionary[Client, ConsumerChecks] = weakref.WeakKeyDictionary()

    def __init__(
        self,
        nc: Client,
        *,
        api_prefix: str = "$JS.API",
        timeout: float = 5.0,
        window_s: float = WINDOW_S,
    ) -> None:
        self.nc = nc
        self.api = api_prefix
        self.timeout = timeout
        self.window_s = window_s
        self.stats: Counter[str] = Counter()  # asked, listed pages, single requests, unsure
        self._asked: dict[str, dict[str, list[asyncio.Future[bool]]]] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._sizes: dict[str, int] = {}  # consumers per stream, as last counted
        self._inbox = ""
        self._sub: Subscription | None = None
        self._replies: dict[str, asyncio.Future[Msg]] = {}
        self._next_token = 0
        # Questions whose consumer, if the server has none, has no work (has_work's absent).
        self._idle_if_absent: set[asyncio.Future[bool]] = set()

    @classmethod
    def of(cls, js: JetStreamContext) -> ConsumerChecks:
        """The checks of ``js``'s connection (made on first use, shared by its steps)."""
        # nats-py keeps them private: the context's connection, API prefix and timeout.
        nc, api, timeout = js._nc, js._prefix, js._timeout
        checks = cls._by_connection.get(nc)
        if checks is None or checks.api != api:
            checks = cls._by_connection[nc] = cls(nc, api_prefix=api, timeout=timeout)
        return checks

    def note_sizes(self, sizes: Mapping[str, int]) -> None:
        """How many consumers each stream has (e.g. from a listing at start): a hint."""
        self._sizes.update(sizes)

    async def has_work(self, stream: str, consumer: str, *, absent: bool = True) -> bool:
        """Whether ``consumer`` has events to deliver, or delivered ones not yet acked.

        The answer comes from a request sent after this call; True when unsure.
        ``absent``: the answer when the server says the consumer does not exist (for
        one made on demand, False: nothing can be waiting in it).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._asked.setdefault(stream, {}).setdefault(consumer, []).append(future)
        if not absent:
            self._idle_if_absent.add(future)
        self.stats["asked"] += 1
        if self._flush is None:
            self._flush = loop.call_later(self.window_s, self._answer_asked)
        try:
            return await future
        finally:
            self._idle_if_absent.discard(future)

    def _answer_asked(self) -> None:
        self._flush = None
        asked, self._asked = self._asked, {}
        task = asyncio.get_running_loop().create_task(self._answer(asked))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _answer(self, asked: dict[str, dict[str, list[asyncio.Future[bool]]]]) -> None:
        try:
            await self._subscribe()
            await asyncio.gather(*(self._answer_stream(s, c) for s, c in asked.items()))
        except Exception as exc:  # the connection's trouble: the steps' pulls meet it too
            log.debug("consumer checks failed: %s", exc)
        finally:  # whatever is left unanswered: work waiting
            for futures in (f for consumers in asked.values() for f in consumers.values()):
                _answer(futures, True)

    async def _answer_stream(
        self, stream: str, asked: dict[str, list[asyncio.Future[bool]]]
    ) -> None:
        left = dict(asked)
        offset = 0
        listed = False  # to the end: a consumer not in the listing does not exist
        # List while the pages still to come answer enough askers each; the rest singly.
        while left and len(left) >= self._pages(stream, offset) * ASKERS_PER_PAGE:
            [page] = await self._requests([(f"CONSUMER.LIST.{stream}", {"offset": offset})])
            consumers = page.get("consumers") if page is not None else None
            if page is not None and _not_found(page, STREAM_NOT_FOUND):
                listed = True  # no stream, so none of its consumers
                break
            if page is None or not isinstance(consumers, list):
                break  # an error: work waiting, for every one left
            self.stats["pages"] += 1
            for info in consumers:
                futures = left.pop(str(info.get("name")), None)
                if futures is not None:
                    _answer(futures, _has_work(info))
            offset += len(consumers)
            self._sizes[stream] = total = int(page.get("total") or offset)
            if len(consumers) < LIST_PAGE or offset >= total:
                listed = True
                break  # listed to the end: those not in it are gone, or just made
        else:  # too few askers left for the pages to come (or none)
            await self._ask_each(stream, left)
            return
        for futures in left.values():
            # Made after the listing was sent, a consumer made on demand was made for
            # an event that rings its step: not in a whole listing is absent.
            self.stats["absent" if listed else "unsure"] += 1
            if listed:
                self._answer_absent(futures)
            else:
                _answer(futures, True)

    async def _ask_each(self, stream: str, left: dict[str, list[asyncio.Future[bool]]]) -> None:
        names = list(left)
        for first in range(0, len(names), IN_FLIGHT):
            chunk = names[first : first + IN_FLIGHT]
            infos = await self._requests(
                [(f"CONSUMER.INFO.{stream}.{name}", None) for name in chunk]
            )
            self.stats["single"] += len(chunk)
            for name, info in zip(chunk, infos, strict=True):
                if info is not None and _not_found(info, CONSUMER_NOT_FOUND, STREAM_NOT_FOUND):
                    self._answer_absent(left[name])
                else:
                    _answer(left[name], info is None or "error" in info or _has_work(info))

    def _answer_absent(self, futures: list[asyncio.Future[bool]]) -> None:
        """The consumer does not exist: work waiting, unless asked with ``absent=False``."""
        for future in futures:
            _answer([future], future not in self._idle_if_absent)

    def _pages(self, stream: str, offset: int) -> int:
        """Listing pages still to come from ``offset`` (at least one)."""
        size = self._sizes.get(stream, 0)
        return max(1, math.ceil((size - offset) / LIST_PAGE))

    async def _subscribe(self) -> None:
        if self._sub is None:
            self._inbox = self.nc.new_inbox()
            self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._replies.pop(msg.subject.rpartition(".")[2], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _requests(
        self, requests: list[tuple[str, dict[str, Any] | None]]
    ) -> list[dict[str, Any] | None]:
        """The server's JSON answers to API requests (None: none came in time, or no JSON).

        All are sent, then their answers awaited under one deadline: no task each.
        """
        loop = asyncio.get_running_loop()
        sent: list[tuple[str, asyncio.Future[Msg]]] = []
        try:
            for what, body in requests:
                self._next_token += 1
                token = str(self._next_token)
                future: asyncio.Future[Msg] = loop.create_future()
                self._replies[token] = future
                sent.append((token, future))
                payload = json.dumps(body).encode() if body else b""
                await self.nc.publish(f"{self.api}.{what}", payload, reply=f"{self._inbox}.{token}")
            async with asyncio.timeout(self.timeout):
                for _, future in sent:
                    await future
        except (TimeoutError, nats.errors.Error) as exc:
            log.debug("consumer checks: %d request(s) unanswered: %r", len(sent), exc)
        finally:
            for token, _ in sent:
                self._replies.pop(token, None)
        return [_json(f.result()) if f.done() and not f.cancelled() else None for _, f in sent]

    async def close(self) -> None:
        """Stop answering (what is asked meanwhile: work waiting)."""
        if self._flush is not None:
            self._flush.cancel()
            self._answer_asked()
        for task in list(self._batches):
            with contextlib.suppress(Exception):
                await task
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


def _json(msg: Msg) -> dict[str, Any] | None:
    try:
        answer = json.loads(msg.data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _not_found(answer: dict[str, Any], *codes: int) -> bool:
    """Whether an API answer is an error with one of these codes."""
    error = answer.get("error")
    return isinstance(error, dict) and error.get("err_code") in codes


def _has_work(info: dict[str, Any]) -> bool:
    return bool(info.get("num_pending") or info.get("num_ack_pending"))


def _answer(futures: list[asyncio.Future[bool]], work: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(work)
