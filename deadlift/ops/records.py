"""Events as JSON-friendly records, for traces, tails and dead-letter views.

The CloudEvents attributes come from :mod:`deadlift.wire.events` and the
``Deadlift-*`` headers of a dead letter from :mod:`deadlift.bus.dlq`: nothing
here parses headers again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nats.aio.msg import Msg

from deadlift.bus import dlq
from deadlift.errors import EventDecodeError
from deadlift.wire import events


def plain(data: Any) -> Any:
    """Event data made JSON-friendly (bytes as hex)."""
    return data.hex() if isinstance(data, bytes | bytearray) else data


def dead_record(letter: dlq.DeadLetter) -> dict[str, Any]:
    """Where a dead letter failed and why: org, workflow, step, kind, error, attempts, time."""
    return {
        "org": letter.org,
        "workflow": letter.workflow,
        "step": letter.step,
        "kind": letter.kind,
        "error": letter.error,
        "attempts": str(letter.attempts),
        "time": letter.time,
    }


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
        "data": plain(event.data),
        "org": ext.get(events.ORG, ""),
        "workflow": ext.get(events.WORKFLOW, ""),
        "step": ext.get(events.STEP, ""),
    }
    if dlq.step_of(subject) is not None:
        record["dead"] = dead_record(dlq.parse(0, headers))
    return record


def decode_record(msg: Msg) -> dict[str, Any]:
    """A received message as :func:`event_record` (raises EventDecodeError)."""
    event = events.decode(msg.headers, msg.data, fallback_id="-", fallback_source="-")
    return event_record(msg.subject, event, msg.headers or {})


def letter_data(letter: dlq.DeadLetter) -> Any:
    """A dead letter's event data, JSON-friendly (or a note saying why it cannot be decoded)."""
    try:
        event = events.decode(
            letter.original_headers(), letter.body, fallback_id="-", fallback_source="-"
        )
    except EventDecodeError as exc:
        return f"<undecodable: {exc}> {letter.body[:200]!r}"
    return plain(event.data)
