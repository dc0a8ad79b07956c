"""Streams and consumers: what captures each subject, and what feeds each step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.manager import JetStreamManager

from deadlift.errors import ConfigError
from deadlift.model import topology
from deadlift.model.orgs import account_name
from deadlift.model.topology import DLQ_PREFIX, STEP_PREFIX, Stream
from deadlift.model.workflow import Step, TriggerStart, Workflow, minimal_subjects
from deadlift.settings import Settings

log = logging.getLogger("deadlift.bus")


# What a stream's consumer ceiling is when the account sets none (-1 on a stream
# means the server's default of 1,000).
UNLIMITED_CONSUMERS = 1_000_000
# JetStream API error codes.
STREAM_NAME_IN_USE = 10058  # a stream of that name exists (other config)
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
UNAVAILABLE = 503  # a JetStream API answer's code: try again (a leader election, say)
LIST_PAGE = 256  # consumers per CONSUMER.LIST answer (the server's page size)


def import_stream(exporter: str) -> str:
    """The stream capturing the events org ``exporter`` sends to this org."""
    return topology.import_stream(account_name(exporter))


@dataclass(frozen=True, slots=True)
class StepInput:
    """One durable consumer feeding a step: its stream, name, subjects, and provenance."""

    stream: str
    consumer: str
    filters: tuple[str, ...]
    origin: str | None = None  # the exporting org, for a trigger arriving through an import
    # Made when first needed, not by `workflow apply` (see step_inputs).
    on_demand: bool = False
    # A trigger's: made by the worker that first finds an event at or after this start
    # (Workflow.starts), delivering from it. None for a step's own input, made by
    # whatever first sends to it.
    start: TriggerStart | None = None


def step_inputs(workflow: Workflow, step: Step) -> list[StepInput]:
    """The consumers of a step: its own input subject, and for an entry step its triggers.

    Every step reads ``deadlift.step.<org>.<workflow>.<step>`` (fed by the steps
    before it and by ``dlq replay``). Entry steps also read the workflow's own
    triggers from the events stream, and each import's triggers from that
    import's stream, so the org that sent an event is known from where it arrived.

    A step's own subject is written only by Deadlift (the steps before it, ``dlq
    replay``), so its consumer is ``on_demand``: made by whatever first sends to it
    (:func:`ensure_on_demand`), not by ``workflow apply``. An entry step's is made
    by its first replay, which most never have. A trigger's consumer is made by the
    worker that first finds an event for it (rung, or a check at its start), from the
    stream sequence ``workflow apply`` recorded (``Workflow.starts``), so no event
    stored since the apply is skipped: :func:`ensure_trigger`. A workflow applied and
    not yet run holds no consumer; each costs the server ~40 KB while it exists. A
    trigger with no recorded start (stored by an earlier version) is made by apply.
    """
    org, name, step_name = workflow.org, workflow.name, step.name
    entry = step in workflow.entry_steps()
    inputs = [
        StepInput(
            Stream.STEPS,
            topology.consumer_name(org, name, step_name),
            (topology.step_subject(org, name, step_name),),
            on_demand=True,
        )
    ]
    if not entry:
        return inputs
    own = [t for t in workflow.trigger if t not in workflow.imports]
    if own:
        consumer = topology.trigger_consumer(org, name, step_name)
        inputs.append(_trigger(workflow, Stream.EVENTS, consumer, own))
    for exporter, subjects in sorted(workflow.imported_triggers().items()):
        consumer = topology.import_consumer(org, name, step_name, exporter)
        inputs.append(_trigger(workflow, import_stream(exporter), consumer, subjects, exporter))
    return inputs


def trigger_inputs(workflow: Workflow) -> list[StepInput]:
    """The consumers of a workflow's triggers (its entry steps' inputs other than their own)."""
    entries = workflow.entry_steps()
    return [i for s in entries for i in step_inputs(workflow, s) if i.stream != Stream.STEPS]


def _trigger(
    workflow: Workflow, stream: str, consumer: str, subjects: list[str], origin: str | None = None
) -> StepInput:
    start = workflow.starts.get(consumer)
    return StepInput(
        stream,
        consumer,
        tuple(minimal_subjects(subjects)),
        origin=origin,
        on_demand=start is not None,
        start=start,
    )


@dataclass(frozen=True, slots=True)
class StepBinding:
    """Where a step's input comes from: a stream and the durable consumer on it."""

    stream: str
    consumer: str
    ack_wait: float = 30.0
    origin: str | None = None  # set for an import's trigger: the exporting org
    filters: tuple[str, ...] = ()  # the consumer's subjects (a cold step subscribes to them)
    # Events pending or awaiting an ack when it was bound (None: not known). A step
    # whose consumer had none goes cold at once instead of starting with a batch fetch.
    waiting: int | None = None
    # False: its consumer, made on demand (StepInput.on_demand), was not there when the
    # step was bound. Until something sends to the step (making it first), the input
    # has nothing to deliver: the step waits cold for that event to ring.
    made: bool = True
    # A trigger's consumer not made yet: the worker that finds an event at or after
    # this start makes it (StepInput.start), and the step then pulls.
    start: TriggerStart | None = None


def stream_config(
    name: str, subjects: list[str], settings: Settings, *, max_consumers: int | None = None
) -> StreamConfig:
    """How Deadlift's own streams are configured (file storage, the settings' age,
    duplicate window and replicas; ``max_consumers`` None: the server's default)."""
    return StreamConfig(
        name=name,
        subjects=subjects,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.stream_max_age_s,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.stream_replicas,
        max_consumers=max_consumers,
    )


def dead_letter_config(settings: Settings) -> StreamConfig:
    """The dead-letter stream's configuration (it has no consumers: letters are read by
    sequence)."""
    return stream_config(Stream.DLQ, [f"{DLQ_PREFIX}.>"], settings)


async def ensure_streams(
    js: JetStreamContext,
    settings: Settings,
    event_subjects: list[str],
    imported: Mapping[str, list[str]] | None = None,
    *,
    require_dead_letter_room: bool = False,
) -> None:
    """Create or extend Deadlift's streams so every subject it uses is captured durably.

    ``imported`` maps an exporting org to the trigger subjects that arrive from it
    through an import; each exporter gets its own stream (see ``import_stream``).

    Two streams are not created here but when first needed, as most orgs never need
    one of them and each stream costs the server ~40 KB of memory: the steps stream
    by the first event sent to a step's own subject (:func:`ensure_on_demand`), the
    dead-letter stream by the org's first dead letter
    (:func:`deadlift.bus.dlq.ensure_stream`). One that exists is brought to the
    settings. An account whose ``max_streams`` leaves no room for them is refused
    with ``require_dead_letter_room`` (``workflow apply``), else logged: an event
    would wait (redelivered) until there is room.

    Raises:
        ConfigError: a subject is captured by another stream, or (with
            ``require_dead_letter_room``) no stream is left for those made when needed.
    """
    account = await js.account_info()
    max_consumers = _stream_consumers(account.limits.max_consumers)

    def config(name: str, subjects: list[str]) -> StreamConfig:
        return stream_config(name, subjects, settings, max_consumers=max_consumers)

    later = []  # made when first needed
    if await _ensure_stream(js, steps_config(settings, max_consumers), create=False) == "absent":
        later.append(Stream.STEPS)
    found: list[str] = []
    if event_subjects:
        found.append(await _ensure_stream(js, config(Stream.EVENTS, event_subjects), merge=True))
    for exporter, subjects in sorted((imported or {}).items()):
        found.append(
            await _ensure_stream(js, config(import_stream(exporter), subjects), merge=True)
        )
    if await _ensure_stream(js, dead_letter_config(settings), create=False) == "absent":
        later.append(Stream.DLQ)
    streams, limit = account.streams + found.count("created"), account.limits.max_streams
    if later and limit is not None and 0 < limit < streams + len(later):
        problem = ConfigError(
            f"the account has {streams} streams and allows {limit}: no room is left for "
            f"{' and '.join(later)}, made when first needed (a step's first event, the "
            "first dead letter); raise limits.max_streams in the org manifest"
        )
        if require_dead_letter_room:
            raise problem
        log.warning("%s", problem)


def _stream_consumers(account_limit: int | None) -> int:
    """A Deadlift stream's consumer ceiling: the account's (limits.max_consumers in the
    org manifest), never the server's per-stream default of 1,000, which "unlimited"
    (-1) falls back to."""
    limit = account_limit or -1
    return limit if limit > 0 else UNLIMITED_CONSUMERS


def steps_config(settings: Settings, max_consumers: int | None = None) -> StreamConfig:
    """The steps stream's configuration: every step's own subject."""
    return stream_config(Stream.STEPS, [f"{STEP_PREFIX}.>"], settings, max_consumers=max_consumers)


async def ensure_steps_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the steps stream unless it is there (creators racing are fine).

    Raises:
        ConfigError: the server refused it (the account's ``max_streams``, say).
    """
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.stream_info(Stream.STEPS)
        return
    account = await js.account_info()
    config = steps_config(settings, _stream_consumers(account.limits.max_consumers))
    try:
        await js.add_stream(config)
    except nats.js.errors.APIError as exc:
        if exc.err_code == STREAM_NAME_IN_USE:  # made meanwhile
            return
        if exc.code == UNAVAILABLE:
            raise
        raise ConfigError(
            f"cannot create the steps stream {Stream.STEPS}: {exc.description or exc}; "
            "raise the org's limits.max_streams in the org manifest if it is full"
        ) from None


def _patient(js: JetStreamContext, subjects: list[str]) -> JetStreamManager:
    """JetStream, waiting as long as the server takes to check a stream's subjects.

    It checks them pairwise: a stream of 20,000 subjects took 15.7 s to create and
    38 s to update on this 2-core machine (``bench/stream_subjects.py``), far over
    the usual 5 s API timeout; 2,000 take 0.2-0.3 s.
    """
    usual = js._timeout  # nats-py keeps it private; it is the context's API timeout
    return JetStreamManager(
        conn=js._nc, prefix=js._prefix, timeout=max(usual, 5.0 + (len(subjects) / 2000) ** 2)
    )


async def _ensure_stream(
    js: JetStreamContext, config: StreamConfig, *, merge: bool = False, create: bool = True
) -> Literal["created", "present", "absent"]:
    """Create the stream (unless not ``create``: it stays "absent") or bring the one
    there to ``config`` ("present")."""
    assert config.name and config.subjects is not None
    try:
        info = await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        if not create:
            return "absent"
        try:
            subjects = minimal_subjects(config.subjects)
            await _patient(js, subjects).add_stream(config.evolve(subjects=subjects))
        except nats.js.errors.APIError as exc:
            raise _stream_conflict(config, exc) from None
        return "created"
    current = list(info.config.subjects or [])
    wanted = minimal_subjects([*current, *config.subjects]) if merge else list(config.subjects)
    changed = (
        sorted(wanted) != sorted(current)
        or info.config.duplicate_window != config.duplicate_window
        or info.config.max_age != config.max_age
        # Replicas are raised, never lowered: a client with the default (1) must
        # not scale down a cluster's R3 streams. Lower them with the nats CLI.
        or (config.num_replicas or 1) > (info.config.num_replicas or 1)
    )
    if changed:
        try:
            await _patient(js, wanted).update_stream(
                info.config.evolve(
                    subjects=wanted,
                    duplicate_window=config.duplicate_window,
                    max_age=config.max_age,
                    num_replicas=max(config.num_replicas or 1, info.config.num_replicas or 1),
                )
            )
        except nats.js.errors.APIError as exc:
            raise _stream_conflict(config, exc) from None
    return "present"


def _stream_conflict(config: StreamConfig, exc: Exception) -> ConfigError:
    replicas = config.num_replicas or 1
    hint = (
        f"; or the server is not a cluster of at least {replicas} JetStream nodes "
        "(DEADLIFT_STREAM_REPLICAS)"
        if replicas > 1
        else ""
    )
    return ConfigError(
        f"cannot capture subjects {', '.join(config.subjects or [])} in stream {config.name}: "
        f"{exc}; another stream may already capture one of them{hint}"
    )


async def ensure_consumers(
    js: JetStreamContext,
    settings: Settings,
    workflow: Workflow,
    step: Step,
    existing: Mapping[tuple[str, str], ConsumerInfo] | None = None,
) -> list[StepBinding]:
    """Create or update the durable pull consumers a step's workers share (``step_inputs``).

    ``existing`` (from :func:`list_consumers`): consumers known to be there already; one
    configured as wanted is not sent to the server again (a worker starting thousands
    of steps that ``workflow apply`` created saves a round trip each), and one not in
    it is known to be absent.

    An ``on_demand`` input's consumer is not created (unless steps never go cold,
    ``idle_cold_s`` 0: nothing would wait for its first replay), only updated if there.
    """
    bindings = []
    for wanted in step_inputs(workflow, step):
        config = consumer_config(wanted.consumer, list(wanted.filters), step, settings)
        lazy = not made_at_apply(wanted, settings)
        try:
            info = (existing or {}).get((wanted.stream, wanted.consumer))
            if lazy and info is None and existing is None:
                info = await consumer_info_or_none(js, wanted.stream, wanted.consumer)
            if lazy and info is None:
                bindings.append(
                    StepBinding(
                        wanted.stream,
                        wanted.consumer,
                        ack_wait=settings.ack_wait_s,
                        origin=wanted.origin,
                        filters=wanted.filters,
                        waiting=0,
                        made=False,
                        start=wanted.start,
                    )
                )
                continue
            if info is None and wanted.stream == Stream.STEPS:
                await ensure_steps_stream(js, settings)  # made when first needed
            if info is None:
                start = None
                if wanted.start is not None:  # steps never go cold: made at once
                    created = (await js.stream_info(wanted.stream)).created
                    start = wanted.start.of_stream(created).seq
                config = consumer_config(
                    wanted.consumer, list(wanted.filters), step, settings, start_seq=start
                )
                info = await js.add_consumer(wanted.stream, config)
            elif not configured_as(info.config, config):
                # Where it delivers from is kept: the server refuses to change it.
                info = await js.add_consumer(wanted.stream, _keeping_start(config, info.config))
        except nats.js.errors.APIError as exc:
            raise ConfigError(
                f"workflow {workflow.key} step {step.name!r}: cannot create consumer "
                f"{wanted.consumer}: {exc}"
            ) from None
        ack_wait = info.config.ack_wait or settings.ack_wait_s
        filters = info.config.filter_subjects or [info.config.filter_subject or ""]
        bindings.append(
            StepBinding(
                wanted.stream,
                wanted.consumer,
                ack_wait=ack_wait,
                origin=wanted.origin,
                filters=tuple(f for f in filters if f) or wanted.filters,
                waiting=_waiting(info),
            )
        )
    return bindings


def _keeping_start(wanted: ConsumerConfig, current: ConsumerConfig) -> ConsumerConfig:
    """``wanted`` with ``current``'s delivery start (which a consumer's update may not change)."""
    return wanted.evolve(
        deliver_policy=current.deliver_policy,
        opt_start_seq=current.opt_start_seq,
        opt_start_time=current.opt_start_time,
    )


def made_at_apply(wanted: StepInput, settings: Settings) -> bool:
    """Whether ``workflow apply`` (and a worker binding the step) makes this consumer."""
    return not (wanted.on_demand and settings.idle_cold_s > 0)


async def consumer_info_or_none(
    js: JetStreamContext, stream: str, consumer: str
) -> ConsumerInfo | None:
    """A consumer's info; None if it (or its stream) does not exist."""
    try:
        return await js.consumer_info(stream, consumer)
    except nats.js.errors.NotFoundError:
        return None


def _waiting(info: ConsumerInfo) -> int | None:
    """Events a consumer has pending or awaiting an ack, if its info says."""
    if info.num_pending is None or info.num_ack_pending is None:
        return None
    return info.num_pending + info.num_ack_pending


async def list_consumers(
    js: JetStreamContext, streams: set[str]
) -> dict[tuple[str, str], ConsumerInfo]:
    """Every consumer of ``streams`` by (stream, name): one request per 256 of them."""
    found: dict[tuple[str, str], ConsumerInfo] = {}
    for stream in sorted(streams):
        offset = 0
        while True:
            try:
                page = await js.consumers_info(stream, offset=offset)
            except nats.js.errors.NotFoundError:
                break
            found.update(((stream, c.name), c) for c in page)
            offset += len(page)
            if len(page) < LIST_PAGE:
                break
    return found


def configured_as(current: ConsumerConfig, wanted: ConsumerConfig) -> bool:
    """Whether a consumer's configuration is already what ``consumer_config`` wants."""

    def filters(c: ConsumerConfig) -> set[str]:
        return set(c.filter_subjects or ([c.filter_subject] if c.filter_subject else []))

    return (
        filters(current) == filters(wanted)
        and current.ack_wait == wanted.ack_wait
        and current.max_ack_pending == wanted.max_ack_pending
        and current.max_deliver == wanted.max_deliver
        and current.ack_policy == wanted.ack_policy
        and current.description == wanted.description
    )


def consumer_config(
    name: str,
    filters: list[str],
    step: Step,
    settings: Settings,
    *,
    start_seq: int | None = None,
) -> ConsumerConfig:
    """The consumer configuration for a step (durable, explicit ack), delivering what is
    stored from now on (or from stream sequence ``start_seq``).

    Deliveries are unlimited: the worker, not the server, decides when an event
    is dead, so an event is never dropped silently (a server that gives up
    after ``max_deliver`` just stops delivering — no output, no dead letter).
    """
    return ConsumerConfig(
        name=name,
        durable_name=name,
        description=f"deadlift step {name}",
        deliver_policy=DeliverPolicy.NEW if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(1000, settings.concurrency * 64),
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


async def delete_consumers(js: JetStreamContext, workflow: Workflow, step: Step) -> None:
    """Remove a step's consumers (ignoring ones already gone)."""
    for wanted in step_inputs(workflow, step):
        await delete_consumer(js, wanted.stream, wanted.consumer)


async def delete_consumer(js: JetStreamContext, stream: str, consumer: str) -> None:
    """Remove one consumer (ignoring one already gone, or its stream)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(stream, consumer)
