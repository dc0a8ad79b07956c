"""Following one run through the stored events of every stream it touched.

A run is named by its trigger event's id. :func:`trace_run` reads one account;
:func:`trace_across_orgs` connects as each org of the manifest (an operator
command) and merges. This module only reads and prints nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
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
from deadlift.bus.identity import require_operator
from deadlift.errors import DeadliftError, EventDecodeError, NotFoundError
from deadlift.model import topology
from deadlift.model.orgs import load_orgs
from deadlift.model.topology import IMPORT_STREAM_PREFIX, Stream
from deadlift.ops.records import dead_record, plain
from deadlift.settings import Settings
from deadlift.wire import events

DEFAULT_SCAN = 10_000
TRACE_STREAMS = (Stream.EVENTS, Stream.STEPS, Stream.DLQ)


class RunNotFoundError(NotFoundError):
    """No stored event belongs to the run."""


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


def belongs_to(run_id: str, stream: str, seq: int, headers: Mapping[str, str] | None) -> bool:
    """Whether a stored message is part of run ``run_id``.

    A Deadlift event names its run in ``ce-deadliftrun``; a trigger is the run
    (its ``ce-id``). A foreign message (no ``ce-`` headers) gets the id the
    worker derives from where it was first stored.
    """
    ce = events.attributes(headers)
    if ce:
        return run_id in (ce.get(events.RUN), ce.get("id"))
    h = headers or {}
    origin = (h.get(dlq.H_STREAM), h.get(dlq.H_SEQ)) if dlq.H_STREAM in h else (stream, str(seq))
    return topology.foreign_event_id(origin[0] or "", origin[1] or "") == run_id


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
    ce = events.attributes(headers)
    try:
        event = events.decode(headers, msg.data or b"", fallback_id="-", fallback_source="-")
        data: Any = plain(event.data)
    except EventDecodeError as exc:
        data = f"<undecodable: {exc}>"
    dead = dead_record(dlq.parse(seq, headers)) if stream == Stream.DLQ else None
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
