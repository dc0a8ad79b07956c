"""Seeing a live system: workers, step status, run traces and tails.

Each worker registers the NATS micro service ``deadlift-worker`` (``$SRV.PING``,
``$SRV.INFO``, ``$SRV.STATS``) with a ``describe`` endpoint on
``deadlift.workers.<service id>`` that answers :meth:`Worker.describe` as JSON.
Everything else here only reads: consumer and stream state, stored messages and
live subjects. This module prints nothing and installs no signal handlers: the
CLI (:mod:`deadlift.cli.monitor`) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from deadlift import bus
from deadlift.bus import dlq
from deadlift.bus.registry import Registry
from deadlift.errors import DeadliftError, EventDecodeError, NotFoundError, PermissionDeniedError
from deadlift.model import names
from deadlift.model.topology import (
    DLQ_PREFIX,
    IMPORT_STREAM_PREFIX,
    STEP_PREFIX,
    WORKER_INFO_SUBJECT,
    WORKER_SERVICE,
    Stream,
)
from deadlift.model.workflow import Workflow, minimal_subjects
from deadlift.settings import Settings
from deadlift.wire import events

SERVICE = WORKER_SERVICE
INFO_SUBJECT = WORKER_INFO_SUBJECT
DISCOVERY_TIMEOUT_S = 0.5
DEFAULT_SCAN = 10_000
TRACE_STREAMS = (Stream.EVENTS, Stream.STEPS, Stream.DLQ)
STAT_NAMES = ("ok", "filtered", "retry", "dead")


class NoWorkersError(DeadliftError):
    """No live worker answered the discovery request."""


class RunNotFoundError(NotFoundError):
    """No stored event belongs to the run."""


def describe_payload(data: bytes) -> dict[str, Any]:
    """Decode a worker's ``describe`` answer (raises ValueError if it is not an object)."""
    result = json.loads(data)
    if not isinstance(result, dict):
        raise ValueError(f"describe answered {type(result).__name__}, not an object")
    return result


# -- discovering workers --------------------------------------------------------


async def request_many(
    nc: Client, subject: str, payload: bytes = b"", *, timeout: float = DISCOVERY_TIMEOUT_S
) -> list[bytes]:
    """Publish one request and gather every reply that arrives within ``timeout``.

    Returns at once when the server says nobody listens (a no-responders status).
    """
    replies: list[bytes] = []
    nobody = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        if msg.headers and msg.headers.get("Status"):
            nobody.set()  # 503: no subscriber at all on the subject
        else:
            replies.append(msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(subject, payload, reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nobody.wait(), timeout)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    if not replies and isinstance(nc, bus.DeadliftClient) and nc.denied(subject):
        raise PermissionDeniedError(f"permission denied: this user may not publish to {subject}")
    return replies


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One live worker, from its service info and its ``describe`` answer."""

    id: str
    version: str
    host: str
    pid: int | None
    orgs: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    uptime_s: float | None = None
    describe_subject: str | None = None
    error: str | None = None
    healthy: bool = True  # false once its watchdog found a module call stuck
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return asdict(self)


async def discover_workers(nc: Client, *, timeout: float = DISCOVERY_TIMEOUT_S) -> list[WorkerInfo]:
    """The live workers this connection can see (its account's), described."""
    infos: dict[str, dict[str, Any]] = {}
    for data in await request_many(nc, INFO_SUBJECT, timeout=timeout):
        with contextlib.suppress(ValueError, TypeError):
            info = json.loads(data)
            if isinstance(info, dict) and info.get("name") == SERVICE and info.get("id"):
                infos[info["id"]] = info
    described = await asyncio.gather(*(_describe(nc, i, timeout) for i in infos.values()))
    return sorted(described, key=lambda w: (w.host, w.pid or 0, w.id))


async def _describe(nc: Client, info: dict[str, Any], timeout: float) -> WorkerInfo:
    """Ask one worker's ``describe`` endpoint (named in its service info)."""
    metadata = info.get("metadata") or {}
    pid = str(metadata.get("pid", ""))
    base = WorkerInfo(
        id=info["id"],
        version=str(info.get("version", "")),
        host=str(metadata.get("host", "")),
        pid=int(pid) if pid.isdigit() else None,
    )
    endpoints = info.get("endpoints") or []
    subject = next((e.get("subject") for e in endpoints if e.get("name") == "describe"), None)
    if not subject:
        return replace(base, error="no describe endpoint")
    try:
        reply = await nc.request(subject, b"", timeout=max(timeout, 1.0))
        described = describe_payload(reply.data)
    except (nats.errors.Error, TimeoutError, ValueError) as exc:
        return replace(base, describe_subject=subject, error=f"describe failed: {exc!r}")
    return replace(
        base,
        describe_subject=subject,
        host=str(described.get("host", base.host)),
        pid=described.get("pid", base.pid),
        orgs=list(described.get("orgs", [])),
        steps=list(described.get("steps", [])),
        stats={k: int(v) for k, v in (described.get("stats") or {}).items()},
        in_flight=int(described.get("in_flight", 0)),
        uptime_s=described.get("uptime_s"),
        healthy=bool(described.get("healthy", True)),
        problems=[str(p) for p in described.get("problems") or []],
    )


async def live_workers(nc: Client, *, timeout: float = DISCOVERY_TIMEOUT_S) -> list[WorkerInfo]:
    """Like :func:`discover_workers`, but no answer at all is an error.

    Raises:
        NoWorkersError: naming the subject asked and what to check.
    """
    found = await discover_workers(nc, timeout=timeout)
    if not found:
        raise NoWorkersError(
            f"no workers answered on {INFO_SUBJECT} within {timeout:g} s; start one with "
            "`deadlift worker` (a worker is visible only to its own org: use --org)"
        )
    return found


# -- status -------------------------------------------------------------------

StepKey = tuple[str, str, str]  # org, workflow, step


@dataclass(frozen=True, slots=True)
class Counts:
    """One step's consumer state, summed over its consumers."""

    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0
    waiting: int = 0
    acked: int = 0  # ack floor (consumer sequence): how many deliveries are done
    consumers: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True, slots=True)
class StepStatus:
    """What one step is doing now."""

    org: str
    workflow: str
    step: str
    pending: int
    ack_pending: int
    redelivered: int
    rate: float | None  # events/s acked since the previous sample; None on the first
    dead_letters: int
    workers: int
    waiting: int
    consumers: int

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Every step of every workflow, at one moment."""

    time: str
    interval_s: float | None
    workers: int
    workers_source: str  # "describe" (workers answered) or "num_waiting" (fallback)
    steps: list[StepStatus]

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        return {
            "time": self.time,
            "interval_s": self.interval_s,
            "workers": self.workers,
            "workers_source": self.workers_source,
            "steps": [s.to_json() for s in self.steps],
        }


def step_consumers(workflow: Workflow) -> dict[StepKey, list[tuple[str, str]]]:
    """``(stream, consumer)`` of every step: its input, and the triggers for entry steps."""
    return {
        (workflow.org, workflow.name, step.name): [
            (i.stream, i.consumer) for i in bus.step_inputs(workflow, step)
        ]
        for step in workflow.steps
    }


async def consumer_counts(js: JetStreamContext, stream: str, consumer: str) -> Counts:
    """One consumer's state (zero if it does not exist)."""
    try:
        info = await js.consumer_info(stream, consumer)
    except nats.js.errors.NotFoundError:
        return Counts()
    return Counts(
        pending=info.num_pending or 0,
        ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0,
        waiting=info.num_waiting or 0,
        acked=info.ack_floor.consumer_seq if info.ack_floor else 0,
        consumers=1,
    )


async def step_counts(js: JetStreamContext, workflows: Sequence[Workflow]) -> dict[StepKey, Counts]:
    """Consumer state per step, summed over the step's consumers."""
    wanted = {k: v for w in workflows for k, v in step_consumers(w).items()}
    pairs = [(key, stream, name) for key, cs in wanted.items() for stream, name in cs]
    results = await asyncio.gather(*(consumer_counts(js, s, n) for _, s, n in pairs))
    totals = dict.fromkeys(wanted, Counts())
    for (key, _, _), counts in zip(pairs, results, strict=True):
        totals[key] = totals[key] + counts
    return totals


async def dead_letter_counts(js: JetStreamContext) -> dict[StepKey, int]:
    """How many dead letters each step has (from the DLQ stream's per-subject counts)."""
    try:
        info = await js.stream_info(Stream.DLQ, subjects_filter=f"{DLQ_PREFIX}.>")
    except nats.js.errors.NotFoundError:
        return {}
    counts: dict[StepKey, int] = {}
    prefix = f"{DLQ_PREFIX}."
    for subject, count in (info.state.subjects or {}).items():
        parts = subject.removeprefix(prefix).split(".")
        if len(parts) == 3:
            counts[(parts[0], parts[1], parts[2])] = count
    return counts


def workers_per_step(workers: Sequence[WorkerInfo]) -> Counter[str]:
    """``org.workflow.step`` → how many of ``workers`` run it."""
    return Counter(step for w in workers for step in set(w.steps))


def rate(previous: Counts | None, current: Counts, seconds: float) -> float | None:
    """Events per second acked between two samples (None without a previous one)."""
    if previous is None or seconds <= 0:
        return None
    return max(current.acked - previous.acked, 0) / seconds


@dataclass(frozen=True, slots=True)
class Sample:
    """Consumer state of every step at one moment (monotonic clock)."""

    at: float
    counts: dict[StepKey, Counts]


class StatusMonitor:
    """Samples every step's state; each report's rate is relative to the previous sample.

    Args:
        js: the JetStream context of the account to watch.
        registry: where the workflows come from (read at every sample: new ones appear).
        workflow: only this workflow (``ORG.NAME`` or ``NAME``).
    """

    def __init__(self, js: JetStreamContext, registry: Registry, workflow: str | None = None):
        self.js = js
        self.registry = registry
        self.workflow = workflow
        self.previous: Sample | None = None

    async def workflows(self) -> list[Workflow]:
        """The workflows to show (raises NotFoundError for an unknown ``workflow``)."""
        if self.workflow:
            return [await self.registry.workflow(self.workflow)]
        return await self.registry.workflows()

    async def sample(self) -> Sample:
        """Read every step's consumers now (and remember it for the next rate)."""
        workflows = await self.workflows()
        loop = asyncio.get_running_loop()
        return Sample(at=loop.time(), counts=await step_counts(self.js, workflows))

    async def report(self, workers: Sequence[WorkerInfo]) -> StatusReport:
        """Sample now and build a report, with rates since the previous sample."""
        previous = self.previous
        current = await self.sample()
        dead = await dead_letter_counts(self.js)
        self.previous = current
        per_step = workers_per_step(workers)
        interval = current.at - previous.at if previous else None
        steps = []
        for key, counts in current.counts.items():
            before = previous.counts.get(key) if previous else None
            step_workers = per_step[".".join(key)] if workers else _waiting_workers(counts)
            steps.append(
                StepStatus(
                    org=key[0],
                    workflow=key[1],
                    step=key[2],
                    pending=counts.pending,
                    ack_pending=counts.ack_pending,
                    redelivered=counts.redelivered,
                    rate=rate(before, counts, interval or 0.0),
                    dead_letters=dead.get(key, 0),
                    workers=step_workers,
                    waiting=counts.waiting,
                    consumers=counts.consumers,
                )
            )
        return StatusReport(
            time=events.now_rfc3339(),
            interval_s=round(interval, 3) if interval is not None else None,
            workers=len(workers),
            workers_source="describe" if workers else "num_waiting",
            steps=steps,
        )


def _waiting_workers(counts: Counts) -> int:
    """Without describe answers: idle workers leave a pull request waiting per consumer."""
    return counts.waiting // max(counts.consumers, 1)


async def status_once(
    nc: Client,
    registry: Registry,
    *,
    interval: float = 1.0,
    workflow: str | None = None,
    discovery_timeout: float = DISCOVERY_TIMEOUT_S,
) -> StatusReport:
    """Two samples ``interval`` apart (for the rates), workers discovered meanwhile."""
    monitor = StatusMonitor(nc.jetstream(), registry, workflow)
    discovery = asyncio.create_task(discover_workers(nc, timeout=discovery_timeout))
    try:
        monitor.previous = await monitor.sample()
        await asyncio.sleep(interval)
        workers = await discovery
    finally:
        discovery.cancel()
    return await monitor.report(workers)


async def status_reports(
    nc: Client,
    registry: Registry,
    stop: asyncio.Event,
    *,
    interval: float = 1.0,
    workflow: str | None = None,
) -> AsyncIterator[StatusReport]:
    """A report every ``interval`` seconds until ``stop`` is set (the first has no rates)."""
    monitor = StatusMonitor(nc.jetstream(), registry, workflow)
    timeout = min(DISCOVERY_TIMEOUT_S, interval / 2)
    while not stop.is_set():
        workers = await discover_workers(nc, timeout=timeout)
        yield await monitor.report(workers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


# -- tracing a run ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One stored message of a run.

    ``org``/``workflow``/``step`` name the step that produced the event (empty
    for the trigger); ``dead`` is set for a dead letter (step, kind, error, attempts).
    """

    at: datetime
    stored: datetime | None
    stream: str
    seq: int
    subject: str
    event_id: str
    type: str
    source: str
    org: str
    workflow: str
    step: str
    data: Any
    account: str | None = None
    dead: dict[str, Any] | None = None
    offset_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        data = {"time": _iso(self.at), **asdict(self)}
        data.pop("at")
        data["stored"] = _iso(self.stored) if self.stored else None
        return data

    @property
    def dedupe_key(self) -> tuple[Any, ...]:
        """Equal for the same stored message read twice (e.g. two orgs on one account)."""
        return (self.stream, self.seq, self.subject, self.event_id, self.stored)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _ce(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The ``ce-`` attributes of a message, by lowercase name without the prefix."""
    found = {}
    for name, value in (headers or {}).items():
        if name.lower().startswith(events.PREFIX):
            found[name.lower()[len(events.PREFIX) :]] = value
    return found


def belongs_to(run_id: str, stream: str, seq: int, headers: Mapping[str, str] | None) -> bool:
    """Whether a stored message is part of run ``run_id``.

    A Deadlift event names its run in ``ce-deadliftrun``; a trigger is the run
    (its ``ce-id``). A foreign message (no ``ce-`` headers) gets the id the
    worker derives from where it was first stored.
    """
    ce = _ce(headers)
    if ce:
        return run_id in (ce.get(events.RUN), ce.get("id"))
    h = headers or {}
    origin = (h.get(dlq.H_STREAM), h.get(dlq.H_SEQ)) if dlq.H_STREAM in h else (stream, str(seq))
    return events.derive_id(origin[0] or "", origin[1] or "") == run_id


async def _stored_headers(
    js: JetStreamContext, stream: str, start: int, *, batch: int = 1000
) -> AsyncIterator[Msg]:
    """Headers (only) of the messages of ``stream`` from sequence ``start`` on."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        headers_only=True,
        inactive_threshold=30.0,
        description="deadlift trace (temporary)",
    )
    info = await js.add_consumer(stream, config)
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
    try:
        remaining = (info.num_pending or 0) > 0
        while remaining:
            try:
                msgs = await sub.fetch(batch, timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return
            for msg in msgs:
                yield msg
            remaining = bool(msgs) and msgs[-1].metadata.num_pending > 0
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)


async def scan_stream(
    js: JetStreamContext,
    stream: str,
    run_id: str,
    *,
    scan: int = DEFAULT_SCAN,
    account: str | None = None,
) -> list[TraceEntry]:
    """The run's messages among the last ``scan`` messages of ``stream``."""
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []
    if not info.state.messages:
        return []
    start = max(info.state.first_seq, info.state.last_seq - scan + 1)
    matches = [
        msg.metadata.sequence.stream
        async for msg in _stored_headers(js, stream, start)
        if belongs_to(run_id, stream, msg.metadata.sequence.stream, msg.headers)
    ]
    entries = [await _trace_entry(js, stream, seq, account) for seq in matches]
    return [e for e in entries if e is not None]


async def _trace_entry(
    js: JetStreamContext, stream: str, seq: int, account: str | None
) -> TraceEntry | None:
    try:
        msg = await js.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError:
        return None  # deleted meanwhile (a replayed dead letter)
    headers = dict(msg.headers or {})
    ce = _ce(headers)
    try:
        event = events.decode(headers, msg.data or b"", fallback_id="-", fallback_source="-")
        data: Any = _plain(event.data)
    except EventDecodeError as exc:
        data = f"<undecodable: {exc}>"
    dead = _dead_info(headers) if stream == Stream.DLQ else None
    when = dead["time"] if dead else ce.get("time")
    return TraceEntry(
        at=_parse_time(when) or msg.time or datetime.now(UTC),
        stored=msg.time,
        stream=stream,
        seq=seq,
        subject=msg.subject or "",
        event_id=ce.get("id", ""),
        type=ce.get("type", ""),
        source=ce.get("source", ""),
        org=ce.get(events.ORG, ""),
        workflow=ce.get(events.WORKFLOW, ""),
        step=ce.get(events.STEP, ""),
        data=data,
        account=account,
        dead=dead,
    )


def _dead_info(headers: Mapping[str, str]) -> dict[str, Any]:
    return {
        "org": headers.get(dlq.H_ORG, ""),
        "workflow": headers.get(dlq.H_WORKFLOW, ""),
        "step": headers.get(dlq.H_STEP, ""),
        "kind": headers.get(dlq.H_KIND, ""),
        "error": headers.get(dlq.H_ERROR, ""),
        "attempts": headers.get(dlq.H_ATTEMPTS, ""),
        "time": headers.get(dlq.H_TIME, ""),
    }


def _plain(data: Any) -> Any:
    """Event data made JSON-friendly (bytes as hex)."""
    return data.hex() if isinstance(data, bytes | bytearray) else data


async def scan_run(
    js: JetStreamContext, run_id: str, *, scan: int = DEFAULT_SCAN, account: str | None = None
) -> list[TraceEntry]:
    """The run's messages in the events, imports, steps and dead-letter streams (unordered)."""
    names = [info.config.name or "" for info in await js.streams_info()]
    imports = [n for n in names if n.startswith(IMPORT_STREAM_PREFIX)]
    streams = [*TRACE_STREAMS, *imports]
    found = await asyncio.gather(
        *(scan_stream(js, s, run_id, scan=scan, account=account) for s in streams)
    )
    return [entry for entries in found for entry in entries]


def order_trace(entries: Sequence[TraceEntry]) -> list[TraceEntry]:
    """Drop duplicates, sort by event time, and set each entry's offset from the first."""
    unique = {e.dedupe_key: e for e in reversed(entries)}  # keeps the first of equals
    ordered = sorted(
        unique.values(), key=lambda e: (e.at, e.stored or e.at, _stream_rank(e.stream))
    )
    if not ordered:
        return []
    first = ordered[0].at
    return [replace(e, offset_ms=round((e.at - first).total_seconds() * 1000, 3)) for e in ordered]


def _stream_rank(stream: str) -> int:
    """Ties in time: triggers (own or imported) first, then step inputs, then dead letters."""
    return TRACE_STREAMS.index(stream) if stream in TRACE_STREAMS else 0


async def trace_run(
    js: JetStreamContext, run_id: str, *, scan: int = DEFAULT_SCAN
) -> list[TraceEntry]:
    """One account's view of a run, in order.

    Raises:
        RunNotFoundError: nothing of the run among the messages scanned.
    """
    entries = order_trace(await scan_run(js, run_id, scan=scan))
    if not entries:
        raise _run_not_found(run_id, scan)
    return entries


Connector = Callable[[Settings], Awaitable[Client]]


async def trace_across_orgs(
    settings: Settings,
    run_id: str,
    *,
    scan: int = DEFAULT_SCAN,
    connect: Connector | None = None,
) -> tuple[list[TraceEntry], list[str]]:
    """A run followed across accounts: connect as each org of the manifest and merge.

    Returns the ordered entries and a warning per org that could not be read.

    Raises:
        RunNotFoundError: no org has anything of the run.
    """
    from deadlift.bus.identity import require_operator
    from deadlift.model.orgs import load_orgs

    await require_operator(settings, command="trace --all-orgs")
    orgs = list(load_orgs(settings.orgs_file).orgs)
    results = await asyncio.gather(
        *(_scan_as(settings, org, run_id, scan, connect or _connect) for org in orgs)
    )
    entries = [e for found, _ in results for e in found]
    warnings = [w for _, w in results if w]
    ordered = order_trace(entries)
    if not ordered:
        raise _run_not_found(run_id, scan, warnings)
    return ordered, warnings


async def _connect(settings: Settings) -> Client:
    return await bus.connect(settings, name="deadlift-trace")


def as_org(settings: Settings, org: str) -> Settings:
    """The same server and manifest, acting as ``org`` with its manifest credentials."""
    return settings.model_copy(
        update={"org": org, "user": None, "password": None, "creds": None, "token": None}
    )


async def _scan_as(
    settings: Settings, org: str, run_id: str, scan: int, connect: Connector
) -> tuple[list[TraceEntry], str | None]:
    try:
        nc = await connect(as_org(settings, org))
    except DeadliftError as exc:
        return [], f"org {org}: {exc}"
    try:
        return await scan_run(nc.jetstream(), run_id, scan=scan, account=org), None
    except (DeadliftError, nats.errors.Error, TimeoutError) as exc:
        return [], f"org {org}: {exc or type(exc).__name__}"
    finally:
        await nc.drain()


def _run_not_found(run_id: str, scan: int, warnings: Sequence[str] = ()) -> RunNotFoundError:
    notes = "".join(f"; {w}" for w in warnings)
    return RunNotFoundError(
        f"no event of run {run_id!r} among the last {scan} messages of "
        f"{', '.join(TRACE_STREAMS)}; check the id (a run id is its trigger event's id), "
        f"scan further with --scan, or follow it into other orgs with --all-orgs{notes}"
    )


# -- tailing a workflow --------------------------------------------------------------


def workflow_subjects(workflow: Workflow) -> list[str]:
    """Every subject a workflow's events travel on: triggers, step inputs, outputs, DLQ."""
    prefix = f"{workflow.org}.{workflow.name}"
    return minimal_subjects(
        [
            *workflow.event_subjects(),
            f"{STEP_PREFIX}.{prefix}.>",
            f"{DLQ_PREFIX}.{prefix}.>",
        ]
    )


def event_record(subject: str, event: events.Event, headers: Mapping[str, str]) -> dict[str, Any]:
    """An event as a JSON-friendly dict, naming the step that produced it.

    ``step`` (with ``org`` and ``workflow``) is empty for a trigger; ``dead`` is
    set on dead-letter subjects (the step that failed and why).
    """
    ext = event.extensions
    record = {
        "subject": subject,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": event.time,
        "run": event.run,
        "extensions": dict(ext),
        "data": _plain(event.data),
        "org": ext.get(events.ORG, ""),
        "workflow": ext.get(events.WORKFLOW, ""),
        "step": ext.get(events.STEP, ""),
    }
    if subject.startswith(f"{DLQ_PREFIX}."):
        record["dead"] = _dead_info(headers)
    return record


def decode_record(msg: Msg) -> dict[str, Any]:
    """A received message as :func:`event_record` (raises EventDecodeError)."""
    event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
    return event_record(msg.subject, event, msg.headers or {})


async def subscribe_all(
    nc: Client, subjects: Sequence[str], cb: Callable[[Msg], Awaitable[None]]
) -> list[Any]:
    """Subscribe to every subject with one callback; raise if the server refuses one.

    Raises:
        ConfigError: a subject is not valid (checked before any subscription).
        PermissionDeniedError: the server refused one.
    """
    for subject in subjects:
        names.check_subject(subject, field="subject", wildcards=True)
    subs = [await nc.subscribe(s, cb=cb) for s in subjects]
    if isinstance(nc, bus.DeadliftClient):
        await asyncio.gather(*(nc.check_allowed(s) for s in subjects))
    return subs
