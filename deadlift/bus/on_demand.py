"""Consumers made when first needed, not by ``workflow apply``.

Every consumer costs nats-server ~40 KB for as long as it exists, so a host's
thousands of workflows applied and not yet run should hold none (see
:func:`deadlift.bus.streams.step_inputs`):

* a step's own consumer is made by whatever first sends to it (the step before it,
  ``dlq replay``): :func:`ensure_on_demand`;
* a trigger's is made by the worker that first finds an event for it, from the
  stream sequence ``workflow apply`` recorded (``Workflow.starts``), so nothing
  sent since the apply is skipped: :func:`ensure_trigger`, :func:`events_from`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from dataclasses import dataclass
from datetime import datetime

import nats.js.api
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from deadlift.bus.streams import (
    STREAM_NOT_FOUND,
    UNAVAILABLE,
    StepBinding,
    consumer_config,
    consumer_info_or_none,
    ensure_steps_stream,
    step_inputs,
)
from deadlift.errors import ConfigError
from deadlift.model.topology import Stream
from deadlift.model.workflow import Step, TriggerStart, Workflow
from deadlift.settings import Settings

TAILS_WINDOW_S = 0.02  # questions about a stream asked within it share one STREAM.INFO


@dataclass(frozen=True, slots=True)
class Tail:
    """A stream's last sequence and creation time (which tells a stream made again)."""

    last_seq: int
    created: datetime | None


class StreamTails:
    """Streams' tails for many steps of a connection: one ``STREAM.INFO`` per stream for the
    questions asked within :data:`TAILS_WINDOW_S`, each sent after every question it
    answers (so it sees whatever was stored before a step asked).

    A worker starting a thousand workflows never run asks for each trigger at once;
    nats-py's ``stream_info`` answer holds the stream's whole configuration (an events
    stream of 2,000 subjects: ~50 KB of JSON, parsed into dataclasses), which one by
    one cost the start seconds. Here only the two fields are read.
    """

    _by_connection: weakref.WeakKeyDictionary[Client, StreamTails] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Client, api_prefix: str, timeout: float) -> None:
        self.nc, self.api, self.timeout = nc, api_prefix, timeout
        self._asked: dict[str, asyncio.Future[Tail | None]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    @classmethod
    def of(cls, js: JetStreamContext) -> StreamTails:
        """The tails of ``js``'s connection (made on first use, shared by its steps)."""
        nc, api, timeout = js._nc, js._prefix, js._timeout  # nats-py keeps them private
        tails = cls._by_connection.get(nc)
        if tails is None or tails.api != api:
            tails = cls._by_connection[nc] = cls(nc, api, timeout)
        return tails

    async def tail(self, stream: str) -> Tail | None:
        """``stream``'s tail (None: there is no such stream).

        Raises:
            nats.errors.Error, nats.js.errors.APIError: the request failed.
        """
        future = self._asked.get(stream)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._asked[stream] = loop.create_future()
            loop.call_later(TAILS_WINDOW_S, self._send, stream)
        return await asyncio.shield(future)

    def _send(self, stream: str) -> None:
        future = self._asked.pop(stream)  # asked from now on: the next request
        task = asyncio.get_running_loop().create_task(self._answer(stream, future))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _answer(self, stream: str, future: asyncio.Future[Tail | None]) -> None:
        try:
            msg = await self.nc.request(f"{self.api}.STREAM.INFO.{stream}", b"", self.timeout)
            answer = json.loads(msg.data)
            error = answer.get("error")
            if error and error.get("err_code") == STREAM_NOT_FOUND:
                tail = None
            elif error:
                raise nats.js.errors.APIError.from_error(error)
            else:
                created = answer.get("created")
                tail = Tail(
                    last_seq=int(answer.get("state", {}).get("last_seq") or 0),
                    created=nats.js.api.Base._parse_utc_iso(created) if created else None,
                )
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(tail)


async def ensure_on_demand(
    js: JetStreamContext, settings: Settings, workflow: Workflow, step: Step
) -> None:
    """Make the consumer of a step's own subject if it is made on demand and missing:
    before sending there (a step's outputs, a replay). It delivers from the stream's
    next sequence, not with ``DeliverPolicy.NEW``: a cluster's consumer leader picks
    "new" when it starts, after events sent meanwhile (5 of 300 were skipped on a
    3-node cluster).

    Raises:
        ConfigError: the server refused it (its account's consumer limit, say).
        nats.errors.Error: NATS is unavailable for now (a cluster electing a leader).
    """
    for wanted in step_inputs(workflow, step):
        if wanted.stream != Stream.STEPS or not wanted.on_demand:
            continue  # a trigger's is made by its receiver: ensure_trigger
        if await consumer_info_or_none(js, wanted.stream, wanted.consumer):
            continue
        # The tail, read with the other steps' (a worker's first events make many).
        tail = await StreamTails.of(js).tail(wanted.stream)
        if tail is None:
            await ensure_steps_stream(js, settings)
            tail = await StreamTails.of(js).tail(wanted.stream)
        last = tail.last_seq if tail else 0
        config = consumer_config(
            wanted.consumer, list(wanted.filters), step, settings, start_seq=last + 1
        )
        where = f"workflow {workflow.key} step {step.name!r}"
        await make_consumer(js, wanted.stream, config, where)


async def ensure_trigger(
    js: JetStreamContext, settings: Settings, step: Step, binding: StepBinding, start: TriggerStart
) -> None:
    """Make a trigger's consumer, delivering from ``start``, unless it is there.

    ``start``: the recorded one (``StepInput.start``), or one :func:`events_from`
    returned; 1 if the stream was made again since. Workers racing are fine: the
    first one's is kept.

    Raises:
        ConfigError: the server refused it (its account's consumer limit, say).
        nats.errors.Error: NATS is unavailable for now (a cluster electing a leader).
    """
    # No look first: the add is a no-op for one made alike, refused (then found) for
    # one made from another start.
    tail = await StreamTails.of(js).tail(binding.stream)
    start = start.of_stream(tail.created if tail else None)
    config = consumer_config(
        binding.consumer, list(binding.filters), step, settings, start_seq=start.seq
    )
    await make_consumer(js, binding.stream, config, f"step {step.name!r}")


async def make_consumer(
    js: JetStreamContext, stream: str, config: ConsumerConfig, where: str
) -> None:
    """Add a consumer; one made meanwhile by someone else (from their start) is kept.

    Raises:
        ConfigError: the server refused it, naming ``where`` and the consumer.
        nats.errors.Error: NATS is unavailable for now (a cluster electing a leader).
    """
    try:
        await js.add_consumer(stream, config)
    except nats.js.errors.APIError as exc:
        if config.name and await consumer_info_or_none(js, stream, config.name):
            return
        if exc.code == UNAVAILABLE:
            raise
        raise ConfigError(f"{where}: cannot create consumer {config.name}: {exc}") from None


async def events_from(
    js: JetStreamContext, stream: str, subjects: tuple[str, ...], start: TriggerStart
) -> tuple[bool, TriggerStart]:
    """Whether ``stream`` holds an event on ``subjects`` at or after ``start``.

    Also a start to ask from next time: when there is none, the stream's next
    sequence as read *before* looking (an event stored meanwhile is after it), so a
    later question does not scan again what this one did.
    """
    tail = await StreamTails.of(js).tail(stream)
    if tail is None:
        return False, start
    start = start.of_stream(tail.created)
    last = tail.last_seq
    if last < start.seq:
        return False, start
    for subject in subjects:
        try:
            await js.get_msg(stream, seq=start.seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            continue
        return True, start
    return False, start.model_copy(update={"seq": last + 1})


async def count_from(
    js: JetStreamContext, stream: str, subjects: tuple[str, ...], start: TriggerStart
) -> int:
    """How many events ``stream`` holds on ``subjects`` at or after ``start``: a trigger's
    backlog while its consumer is not made (no worker has come since they were sent).

    Counted by a short-lived consumer of the server's own (no acks, in memory, removed
    at once): only when :func:`events_from` found one, so an idle trigger costs none.
    """
    found, start = await events_from(js, stream, subjects, start)
    if not found:
        return 0
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start.seq,
            ack_policy=AckPolicy.NONE,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=list(subjects) if len(subjects) > 1 else None,
            inactive_threshold=5.0,
            mem_storage=True,
        ),
    )
    if info.name:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, info.name)
    return info.num_pending or 0


async def ensure_triggers(js: JetStreamContext, settings: Settings, workflow: Workflow) -> None:
    """Make every trigger consumer of a stored workflow not made yet, from its recorded
    start: for an operator or a test that must act on one before any worker has."""
    for step in workflow.entry_steps():
        for wanted in step_inputs(workflow, step):
            if wanted.start is not None:
                binding = StepBinding(wanted.stream, wanted.consumer, filters=wanted.filters)
                await ensure_trigger(js, settings, step, binding, wanted.start)


async def input_has_events(js: JetStreamContext, binding: StepBinding) -> bool:
    """Whether a step's input has events to deliver or delivered ones not yet acked.

    A consumer not made yet (``binding.made`` False) has none if it is a step's own
    (its sender makes it first); a trigger's has those its stream holds at or after
    its start.
    """
    try:
        info = await js.consumer_info(binding.stream, binding.consumer)
    except nats.js.errors.NotFoundError:
        if binding.made:
            raise
        if binding.start is None:
            return False
        found, _ = await events_from(js, binding.stream, binding.filters, binding.start)
        return found
    return bool(info.num_pending or info.num_ack_pending)
