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

import contextlib

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from deadlift.bus.streams import (
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
        await ensure_steps_stream(js, settings)
        last = (await js.stream_info(wanted.stream)).state.last_seq or 0
        config = consumer_config(
            wanted.consumer, list(wanted.filters), step, settings, start_seq=last + 1
        )
        where = f"workflow {workflow.key} step {step.name!r}"
        await make_consumer(js, wanted.stream, config, where)


async def ensure_trigger(
    js: JetStreamContext, settings: Settings, step: Step, binding: StepBinding, start: TriggerStart
) -> None:
    """Make a trigger's consumer, delivering from ``start``, unless it is there.

    ``start``: the recorded one (``StepInput.start``), or a later one before which
    :func:`events_from` found no event for it; 1 if the stream was made again since.
    Workers racing are fine: the first one's is kept.

    Raises:
        ConfigError: the server refused it (its account's consumer limit, say).
        nats.errors.Error: NATS is unavailable for now (a cluster electing a leader).
    """
    # No look first: the add is a no-op for one made alike, refused (then found) for
    # one made from another start.
    start = start.of_stream((await js.stream_info(binding.stream)).created)
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
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False, start
    start = start.of_stream(info.created)
    last = info.state.last_seq or 0
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
