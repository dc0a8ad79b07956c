"""``deadlift bench``'s timing window: from when every worker is pulling to the last output.

Every throughput scenario, the bare loop's included, is timed the same way:

1. A fresh server; the workflow applied, so its consumers exist. The consumer
   of the first step's input is **paused** (JetStream consumer pause,
   nats-server 2.11 or later): :func:`hold`.
2. The backlog is published and stored, every PubAck awaited. Nothing is
   delivered.
3. The worker processes start: imports, connecting, loading and probing the
   module, binding the consumers all happen now, outside the window. Finding
   nothing to deliver, each process waits in a long pull request on each of its
   consumers; the bench waits until every consumer has one from every process
   (``num_waiting``), twice in a row: :func:`pulling`.
4. The pause is set to end a moment ahead (:data:`LEAD_S`): the server answers the
   waiting pull requests at that instant (within 1-2 ms, measured). The window
   opens then: :func:`release`. (Resuming a consumer at once is no good: the
   server leaves the waiting requests unanswered until a new message arrives —
   nats-server 2.15.1 — while a pause that runs out answers them.)
5. The window closes at the time the server stored the last output
   (:func:`finished_at`).

Both ends are the server's timestamps, so a figure depends neither on how often
the bench looks (every :data:`POLL_S`, only to know when to stop) nor on the
bench process: it publishes before the window and sleeps during it. A worker
under test thus gets the machine as it would in production: the server and the
worker's processes, nothing else of the bench's.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.js.api import ConsumerConfig, DeliverPolicy

from deadlift.bus.on_demand import make_consumer
from deadlift.bus.streams import consumer_config, step_inputs
from deadlift.errors import DeadliftError
from deadlift.model.topology import Stream
from deadlift.model.workflow import Workflow
from deadlift.ops.bench_support import stored, until
from deadlift.ops.discovery import discover_workers
from deadlift.settings import Settings

FOREVER = "2100-01-01T00:00:00Z"
LEAD_S = 0.3  # between setting the pause's end and the end: the request's round trip, and more
POLL_S = 0.1
PULLING_TIMEOUT_S = 120.0  # processes starting on a busy machine
RUN_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Gate:
    """Where a scenario's window opens and closes.

    Attributes:
        stream: the stream of the held consumer.
        consumer: the consumer of the first step's input, paused until the window opens.
        pulls: the (stream, consumer) pairs every worker process must be pulling from.
        output: the subject of the last step's outputs.
        output_stream: the stream capturing ``output``.
    """

    stream: str
    consumer: str
    pulls: tuple[tuple[str, str], ...]
    output: str
    output_stream: str = Stream.EVENTS
    # The held consumer's configuration, if it may not be made yet (a trigger's is made
    # by the first worker to find an event): :func:`hold` makes it first.
    make: ConsumerConfig | None = None

    @classmethod
    def of(cls, workflow: Workflow, output: str) -> Gate:
        """The gate of a Deadlift workflow: its trigger consumer, held and watched.

        Only the trigger's pulls are awaited: the backlog waits there. The other
        steps' consumers have nothing yet, so a worker's steps there wait cold (no
        pull request, see ``deadlift.runtime.pulling``) until the first output rings.
        """
        entry = workflow.entry_steps()[0]
        trigger = next(w for w in step_inputs(workflow, entry) if w.stream == Stream.EVENTS)
        config = consumer_config(trigger.consumer, list(trigger.filters), entry, Settings())
        pulls = ((trigger.stream, trigger.consumer),)
        return cls(trigger.stream, trigger.consumer, pulls, output, make=config)


async def hold(js: Any, gate: Gate) -> None:
    """Pause the gate's consumer (made first if need be): events stored from now on wait."""
    if gate.make is not None:
        last = (await js.stream_info(gate.stream)).state.last_seq or 0
        config = gate.make.evolve(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1
        )
        await make_consumer(js, gate.stream, config, "bench")
    await js.pause_consumer(gate.stream, gate.consumer, FOREVER)


async def pulling(
    js: Any,
    pulls: Iterable[tuple[str, str]],
    processes: Callable[[], int],
    check: Callable[[], None] = lambda: None,
) -> None:
    """Return when each consumer of ``pulls`` has a pull request waiting from every process.

    Twice in a row, :data:`POLL_S` apart: a request that has just expired is not
    counted for a process not pulling yet. ``processes()`` is how many must be
    pulling (it grows while a supervisor starts its children); ``check()``
    raises if a process has died.
    """
    steady = 0

    async def ready() -> bool:
        nonlocal steady
        check()
        wanted = processes()
        for stream, consumer in pulls:
            info = await js.consumer_info(stream, consumer)
            if (info.num_waiting or 0) < wanted:
                steady = 0
                return False
        steady += 1
        return steady >= 2

    await until(ready, PULLING_TIMEOUT_S, every=POLL_S)


async def serving(
    nc: Any, processes: Callable[[], int], check: Callable[[], None] = lambda: None
) -> None:
    """Return when every worker process answers ``deadlift workers``.

    A worker advertises itself once all its steps have started; with nothing to
    do they wait cold, without a pull request to see on the server.
    """

    async def ready() -> bool:
        check()
        return len(await discover_workers(nc, timeout=0.3)) >= processes()

    await until(ready, PULLING_TIMEOUT_S, every=POLL_S)


async def release(js: Any, gate: Gate) -> float:
    """End the pause :data:`LEAD_S` from now; that instant (seconds since the epoch)."""
    for _ in range(5):
        at = time.time() + LEAD_S
        answer = await js.pause_consumer(gate.stream, gate.consumer, _rfc3339(at))
        if answer.paused:  # else the request took longer than LEAD_S: hold again, retry
            return at
        await hold(js, gate)
    raise DeadliftError("bench: the machine is too busy to open the timing window")


async def finished_at(js: Any, gate: Gate) -> float:
    """When the server stored the last output (seconds since the epoch)."""
    last = await js.get_last_msg(gate.output_stream, gate.output)
    return float(last.time.timestamp())


async def window(
    js: Any,
    gate: Gate,
    *,
    count: int,
    processes: Callable[[], int],
    check: Callable[[], None] = lambda: None,
) -> float:
    """Seconds from every process pulling to the ``count``-th output (steps 3 to 5 above)."""
    await pulling(js, gate.pulls, processes, check)
    opened = await release(js, gate)

    async def done() -> bool:
        check()
        return await stored(js, gate.output, gate.output_stream) >= count

    await until(done, RUN_TIMEOUT_S, every=POLL_S)
    return await finished_at(js, gate) - opened


def _rfc3339(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
