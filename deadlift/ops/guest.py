"""A guest's view of its modules' runs at its hosts: listing, following, aggregating.

The hosts' workers send a record per call of the guest's module
(:mod:`deadlift.runtime.runs`); they arrive in the guest's account on
``deadlift.from.<host>.runs.<workflow>.<step>`` and its ``DEADLIFT_GUEST_RUNS``
stream keeps them. Which host sent a record is the subject's ``<host>`` token:
only the server writes ``deadlift.from.<host>.…``, through the import from
that host's account; the body is the host's claim, and its ``host`` field is
overwritten. Everything else in a record is the host's text: show it escaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from deadlift.bus.integration_streams import ensure_integration_streams
from deadlift.model import integrations as links
from deadlift.model import names
from deadlift.model.orgs import OrgManifest
from deadlift.model.topology import GUEST_RUNS_STREAM, Outcome

DEFAULT_LAST = 50
STATUS_SCAN = 10_000  # `guest status` aggregates the newest this many records
FOLLOW_PENDING = 10_000  # records a follower may hold unread before the server waits
_BATCH = 256
_Key = tuple[str, str, str, str]  # host, workflow, step, module: a row of `guest status`
_KEY_FIELDS = ("host", "workflow", "step", "module")


def runs_filter(host: str | None = None) -> str:
    """The subjects of the run records from ``host`` (every host: None).

    Raises:
        ConfigError: ``host`` is not a valid org name.
    """
    if host is not None:
        names.check_name(host, field="--host")
    return links.from_subject(host or "*", links.RUNS, ">")


def parse_run(msg: Msg) -> dict[str, Any] | None:
    """The record in a stored message, its ``host`` taken from the subject (None: not one)."""
    tokens = msg.subject.split(".")
    if len(tokens) < 5 or ".".join(tokens[:2]) != links.FROM or tokens[3] != links.RUNS:
        return None
    try:
        record = json.loads(msg.data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    record["host"] = tokens[2]
    with contextlib.suppress(AttributeError, TypeError):
        record["seq"] = msg.metadata.sequence.stream
    return record


async def runs_stream_exists(js: JetStreamContext) -> bool:
    """Whether this account keeps run records (it guests in some integration)."""
    try:
        await js.stream_info(GUEST_RUNS_STREAM)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def ensure_runs_stream(js: JetStreamContext, manifest: OrgManifest, org: str) -> bool:
    """Create ``org``'s integration streams if they are missing; whether it keeps run records."""
    made = await ensure_integration_streams(js, manifest, org)
    return GUEST_RUNS_STREAM in made


async def guest_runs(
    js: JetStreamContext, *, host: str | None = None, last: int = DEFAULT_LAST
) -> list[dict[str, Any]]:
    """The newest ``last`` run records, oldest first, optionally only those from ``host``.

    Reads backwards in widening windows of the stream, so a host with few records
    among many does not make it read the whole stream at once.

    Raises:
        ConfigError: ``host`` is not a valid org name.
    """
    subject = runs_filter(host)
    try:
        info = await js.stream_info(GUEST_RUNS_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    if not info.state.messages or last <= 0:
        return []
    found: list[dict[str, Any]] = []
    high, window = info.state.last_seq, last
    while high >= info.state.first_seq and len(found) < last:
        low = max(info.state.first_seq, high - window + 1)
        chunk = [r async for r in _stored(js, subject, low, high)]
        found = chunk + found
        high, window = low - 1, window * 4
    return found[-last:]


async def follow_runs(
    js: JetStreamContext,
    *,
    host: str | None = None,
    stop: asyncio.Event | None = None,
    start_seq: int | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Run records as they arrive until ``stop`` is set: new ones, or from ``start_seq`` on.

    An ordered consumer: no state left behind, and the server holds back when the
    reader falls :data:`FOLLOW_PENDING` records behind.
    """
    start = (
        ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
        if start_seq is not None
        else None
    )
    sub = await js.subscribe(
        runs_filter(host),
        stream=GUEST_RUNS_STREAM,
        config=start,
        ordered_consumer=True,
        deliver_policy=None if start is not None else DeliverPolicy.NEW,
        pending_msgs_limit=FOLLOW_PENDING,
    )
    try:
        while stop is None or not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.25)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            record = parse_run(msg)
            if record is not None:
                yield record
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def guest_status(js: JetStreamContext, *, scan: int = STATUS_SCAN) -> list[dict[str, Any]]:
    """Per host, workflow, step and module: runs per outcome, latency, the last error.

    Over the newest ``scan`` records. Each row: ``host``, ``workflow``, ``step``,
    ``module``, ``runs``, ``outcomes`` (count per outcome), ``p50_ms``, ``p99_ms``,
    ``last_run`` (time), ``last_error`` (``kind``, ``message``, ``time``) or None.
    """
    rows: dict[_Key, dict[str, Any]] = {}
    latencies: dict[_Key, list[float]] = {}
    for record in await guest_runs(js, last=scan):
        key = _key(record)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                **dict(zip(_KEY_FIELDS, key, strict=True)),
                "runs": 0,
                "outcomes": Counter(),
                "last_run": None,
                "last_error": None,
            }
        row["runs"] += 1
        row["outcomes"][str(record.get("outcome"))] += 1
        row["last_run"] = record.get("time")
        if record.get("error_kind"):
            row["last_error"] = {
                "kind": str(record["error_kind"]),
                "message": str(record.get("error") or ""),
                "time": record.get("time"),
            }
        latency = record.get("latency_ms")
        if isinstance(latency, int | float) and not isinstance(latency, bool):
            latencies.setdefault(key, []).append(float(latency))
    result = []
    for key in sorted(rows):
        row, ordered = rows[key], sorted(latencies.get(key, []))
        counts: Counter[str] = row["outcomes"]
        # Known outcomes first, in their order; then whatever else a host sent.
        row["outcomes"] = {o: counts[o] for o in dict.fromkeys([*Outcome, *counts]) if counts[o]}
        row["p50_ms"] = _percentile(ordered, 50)
        row["p99_ms"] = _percentile(ordered, 99)
        result.append(row)
    return result


def _key(record: dict[str, Any]) -> _Key:
    host, workflow, step, module = (str(record.get(f) or "") for f in _KEY_FIELDS)
    return host, workflow, step, module


def _percentile(ordered: list[float], p: int) -> float | None:
    """Nearest-rank percentile of sorted values (None: no values)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return round(ordered[rank - 1], 3)


async def _stored(
    js: JetStreamContext, subject: str, low: int, high: int
) -> AsyncIterator[dict[str, Any]]:
    """The records on ``subject`` stored at sequences ``low`` to ``high``."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=low,
        filter_subject=subject,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        description="deadlift guest runs (temporary)",
    )
    info = await js.add_consumer(GUEST_RUNS_STREAM, config)
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=GUEST_RUNS_STREAM)
    try:
        remaining = (info.num_pending or 0) > 0
        while remaining:
            try:
                msgs = await sub.fetch(_BATCH, timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                return
            for msg in msgs:
                if msg.metadata.sequence.stream > high:
                    return
                record = parse_run(msg)
                if record is not None:
                    yield record
            remaining = bool(msgs) and msgs[-1].metadata.num_pending > 0
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(GUEST_RUNS_STREAM, info.name)
