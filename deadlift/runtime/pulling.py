"""How a step asks its consumer for events: in batches, in a long pull, or cold.

Three modes, by how recently the step had work:

* **backlog** — events are waiting: a batch with a short wait for stragglers.
* **warm** — caught up, but an event came in the last ``idle_cold_s``: one long
  pull request (``idle_pull_s``) that the next event ends at once. A step starts
  with a batch fetch (unless known idle: below), and goes cold at once if that
  finds nothing.
* **cold** — idle for longer: no pull request at all. The step subscribes (core
  NATS, at most one message per subject) to its consumer's subjects and waits for
  an event to *ring*. A host's thousands of idle steps then cost the worker and
  the server nothing (as warm steps, 4,000 consumers made 400 requests/s, 20 % of a
  core). A rung step pulls as a warm one: one round trip more for the first event.

Going cold is safe only if nothing can reach the consumer without ringing. After
subscribing, the step waits :data:`SETTLE_S` and asks the consumer whether events
are pending: one stored before the subscription took effect shows there, and so
does one published just before it and stored just after (the request is sent
after the subscription, and after the time an event takes from being routed to
being stored). An event stored between the step's last pull and its subscription
waits for that check, up to :data:`SETTLE_S`: one check per cold spell (a check
at once as well cost the thousands of steps of a worker's start a request each,
for a rare race). Events delivered to someone else and not yet acked
(another worker holds them, or a nak's delay runs) come back without a publish:
while there are any the step stays warm, and checks at once whenever it would go
cold. After a reconnect (the subscriptions and any pull requests are renewed)
every cold step checks again, at once and after :data:`SETTLE_S`, and each checks
every ``cold_recheck_s`` in any case.

A step whose consumer had nothing pending nor awaiting an ack when the step was
bound to it (a worker starting thousands of steps knows that from one listing)
goes cold at once, without the batch fetch a step starts with: the check finds
any event stored since.

A consumer made on demand and not made yet has nothing to deliver, so its step
waits cold: a step's own is made by its first event's sender, which rings it. A
trigger's is this step's to make (from the start ``workflow apply`` recorded),
when an event rings or its check finds one in the stream at or after that start;
the step then pulls. Events sent while no worker ran are found by a check as soon
as the step's doorbell is armed (and the usual one :data:`SETTLE_S` after).

The checks of all the steps of a connection go through one
:class:`~deadlift.bus.checks.ConsumerChecks`: those asked together are answered
together (a listing of the stream when many ask, as every cold step does after a
reconnect), each by a request sent after it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from deadlift.bus.on_demand import events_from
from deadlift.bus.pull import Pull
from deadlift.bus.streams import StepBinding
from deadlift.model.workflow import TriggerStart
from deadlift.settings import Settings

log = logging.getLogger("deadlift.worker")

BACKLOG_WAIT_S = 0.5  # bounds a backlog's batch fetch (the server answers it at once)
SETTLE_S = 1.0  # longer than an event takes from being routed to being stored


class Checks(Protocol):
    """Answers whether a consumer has work (:class:`~deadlift.bus.checks.ConsumerChecks`)."""

    async def has_work(self, stream: str, consumer: str, *, absent: bool = True) -> bool: ...


class Puller:
    """One step's fetches: batches while there is a backlog, a long pull or a doorbell after."""

    def __init__(
        self,
        pull: Pull,
        nc: Client,
        js: JetStreamContext,
        binding: StepBinding,
        settings: Settings,
        batch: int,
        *,
        checks: Checks | None = None,
        make: Callable[[TriggerStart], Awaitable[None]] | None = None,
    ) -> None:
        self.pull = pull
        self.nc = nc
        self.js = js
        self.binding = binding
        self.batch = batch
        self.idle_pull_s = settings.idle_pull_s
        self.cold_after_s = settings.idle_cold_s
        self.recheck_s = settings.cold_recheck_s
        self.checks = checks  # None: each check is a consumer_info of its own
        self.waiting = False  # in a long pull or cold: nothing of ours to finish
        self.cold = False
        # A batch fetch first, unless the consumer had no events when the step was bound:
        # then straight to the doorbell, whose check finds any stored since.
        self._backlog = binding.waiting != 0 or not self.cold_after_s
        # Warm only once an event came: a worker starting 30,000 steps would otherwise
        # renew 3,000 long pulls a second for its first idle_cold_s.
        self._warm_until = time.monotonic()
        self._bell: Doorbell | None = None
        self._recheck = False
        # The last check found work, and no pull found an event since: events held
        # elsewhere (they come back without a ring), so the next cold spell checks at once.
        self._held = False
        self._stopped = False
        # The consumer (made on demand) was not there when the step was bound: a check
        # or pull finding none means no work, until an event rings or a pull succeeds.
        # After that a missing consumer is trouble (a cluster electing its leader
        # answers "not found" too), so the step pulls and retries rather than waits.
        self._unmade = not binding.made
        # A trigger's consumer not made yet is this step's to make (``make(start)``), from
        # the recorded start, once an event is found at or after it (a later start
        # when a check found none before it: the stream is not scanned again).
        self._make = make
        self._start = binding.start if not binding.made else None
        self._make_first = False
        # Events sent while no worker ran wait for no ring: the first cold spell looks
        # at once too (tails are read together, so a thousand triggers cost a request).
        self._look_at_once = self._start is not None

    def stop(self) -> None:
        """No more pulls; a cold wait ends now (a cancel alone may be swallowed)."""
        self._stopped = True
        self.ring()

    async def next(self) -> list[Msg]:
        """The next events (none when a wait ended without any, or once stopped)."""
        if self._stopped:
            return []
        if self._make_first:
            await self._make_trigger()  # raises on trouble: the step retries shortly
        if self._backlog:
            try:
                msgs = await self.pull.fetch(self.batch, BACKLOG_WAIT_S, no_wait=True)
            except (TimeoutError, nats.errors.TimeoutError):
                self._backlog = False
                return []
            except nats.js.errors.APIError as exc:
                return self._not_made_yet(exc)
        elif self.cold_after_s and time.monotonic() >= self._warm_until:
            await self._sleep_cold()
            return []
        else:
            # Caught up: a single message, as soon as it arrives (low latency).
            self.waiting = True
            try:
                msgs = await self.pull.fetch(1, self.idle_pull_s)
            except (TimeoutError, nats.errors.TimeoutError):
                return []
            except nats.js.errors.APIError as exc:
                return self._not_made_yet(exc)
            finally:
                self.waiting = False
        self._backlog = bool(msgs[-1].metadata.num_pending)
        self._warm_until = time.monotonic() + self.cold_after_s
        self._held = self._unmade = False
        return msgs

    async def _make_trigger(self) -> None:
        assert self._start is not None
        if self._make is None:
            raise RuntimeError(f"{self.binding.consumer}: no way to make the trigger's consumer")
        await self._make(self._start)
        self._make_first = False
        self._start = None  # made: its own state answers from now on

    def _not_made_yet(self, exc: Exception) -> list[Msg]:
        """A consumer made on demand that is not there: nothing to deliver, so wait cold
        for the event that rings (its maker makes it first). Anything else is raised."""
        if not self._unmade or not self.cold_after_s:
            raise exc
        log.debug("%s has no consumer yet (%s): waiting cold", self.binding.consumer, exc)
        self._backlog = False
        self._warm_until = time.monotonic()
        return []

    def ring(self) -> None:
        """Wake the step if it is cold: it pulls once, as for an event."""
        if self._bell is not None:
            self._bell.ring()

    def recheck(self) -> None:
        """Make a cold step check its consumer again, staying cold if it has nothing: after a
        reconnect (the subscriptions were renewed; what came meanwhile rang nothing)."""
        if self._bell is not None:
            self._recheck = True
            self._bell.ring()

    async def _sleep_cold(self) -> None:
        """Wait, without a pull request, until an event may be there; then stay warm a while."""
        bell = Doorbell(self.nc, self.binding.filters)
        self._bell = bell
        self.waiting = True
        try:
            await bell.arm()
            check_now, self._look_at_once = self._held or self._look_at_once, False
            while await self._stay_cold(bell, check_now):
                check_now = True  # a recheck: a check now, then the same sequence again
        finally:
            self.cold = self.waiting = False
            self._bell = None
            await bell.disarm()
        if not self._stopped:
            # Rung, or work found: a step's sender made its consumer; a trigger's is
            # this step's to make, before it pulls.
            self._make_first = self._unmade and self._start is not None
            self._unmade = False
        # One long pull: a ring's event is stored by then, or arrives during it.
        self._warm_until = time.monotonic() + self.idle_pull_s

    async def _stay_cold(self, bell: Doorbell, check_now: bool) -> bool:
        """Until the step has work or rang (False) or is asked to check again (True)."""
        self._recheck = False
        # Wait a moment (an event routed before the subscription is stored by then),
        # check, then wait for a ring with a check now and then.
        waits = itertools.chain([SETTLE_S], iter(self._recheck_after, None))
        for settled, wait in enumerate(waits):
            if (
                self._stopped
                or ((settled or check_now) and await self._work_waiting())
                or self._denied(bell)
            ):
                return False
            self.cold = bool(settled)  # only the bell (and the safety net) wakes it now
            if await bell.wait(wait):
                # An event rang (or a stop), or only a recheck: then no pull, a check.
                return self._recheck and not self._stopped and bell.quiet()
        return False  # not reached: the waits never end

    def _recheck_after(self) -> float:
        # Spread so that thousands of cold steps do not check at once.
        return self.recheck_s * random.uniform(0.8, 1.2)

    def _denied(self, bell: Doorbell) -> bool:
        """Whether the org may not subscribe there: then this step never goes cold again."""
        problem = bell.denied()
        if problem is not None:
            log.warning("%s cannot go cold (stays warm): %s", self.binding.consumer, problem)
            self.cold_after_s = 0.0
        return problem is not None

    async def _work_waiting(self) -> bool:
        """Whether the consumer has events to deliver, or delivered ones not yet acked."""
        self._held = await self._ask()
        return self._held

    async def _ask(self) -> bool:
        absent = not self._unmade  # a consumer not made yet: absent is idle
        if self._unmade and self._start is not None:
            # A trigger's consumer not made yet: work if the stream has an event for it
            # (then, absent, it is this step's to make).
            try:
                found, self._start = await events_from(
                    self.js, self.binding.stream, self.binding.filters, self._start
                )
            except Exception as exc:  # pulling will meet the trouble and report it
                log.debug("looking for events of %s failed: %s", self.binding.consumer, exc)
                return True
            if not found:
                return False
            absent = True
        if self.checks is not None:  # asked with the other steps' (True when unsure)
            return await self.checks.has_work(
                self.binding.stream, self.binding.consumer, absent=absent
            )
        try:
            info = await self.js.consumer_info(self.binding.stream, self.binding.consumer)
        except nats.js.errors.NotFoundError:
            return absent
        except Exception as exc:  # pulling will meet the trouble and report it
            log.debug("consumer info of %s failed: %s", self.binding.consumer, exc)
            return True
        return bool(info.num_pending or info.num_ack_pending)


class Doorbell:
    """Core subscriptions to a consumer's subjects, one message each, that wake a waiter."""

    def __init__(self, nc: Client, subjects: tuple[str, ...]) -> None:
        self.nc = nc
        self.subjects = subjects
        self._subs: list[Any] = []
        self._futures: list[asyncio.Future[Msg]] = []
        self._rung = asyncio.Event()

    async def arm(self) -> None:
        """Subscribe (the server drops each subscription after its first message)."""
        loop = asyncio.get_running_loop()
        for subject in self.subjects:
            # A future, not a callback: nats-py starts no task for it.
            future: asyncio.Future[Msg] = loop.create_future()
            future.add_done_callback(lambda _: self._rung.set())
            self._futures.append(future)
            sub = await self.nc.subscribe(subject, future=future)
            await sub.unsubscribe(limit=1)
            self._subs.append(sub)

    def ring(self) -> None:
        self._rung.set()

    def quiet(self) -> bool:
        """Whether no event rang it (only :meth:`ring`); then it is ready to ring again."""
        if any(f.done() and not f.cancelled() for f in self._futures):
            return False
        self._rung.clear()
        return True

    async def wait(self, timeout: float) -> bool:
        """Whether it rang within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # no task, as wait_for would start
                await self._rung.wait()
        return self._rung.is_set()

    def denied(self) -> str | None:
        """The server's permission error for one of the subscriptions, if it sent one."""
        denied = getattr(self.nc, "denied", None)
        if denied is None:
            return None
        return next((d for s in self.subjects if (d := denied(s)) is not None), None)

    async def disarm(self) -> None:
        for future in self._futures:
            future.cancel()  # nats-py drops a message for a cancelled future
        for sub in self._subs:
            with contextlib.suppress(Exception):  # gone already (rang, or the connection)
                await sub.unsubscribe()
        self._subs.clear()
