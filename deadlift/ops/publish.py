"""Publishing one event from outside a workflow (``deadlift publish``, scripts, tests)."""

from __future__ import annotations

from typing import Any

from nats.js.api import PubAck

from deadlift.bus.publisher import Publisher
from deadlift.wire import events

DEFAULT_TYPE = "deadlift.publish"
DEFAULT_SOURCE = "deadlift://cli"


async def publish_event(
    publisher: Publisher,
    subject: str,
    data: Any,
    *,
    id: str | None = None,
    type: str = DEFAULT_TYPE,
    source: str = DEFAULT_SOURCE,
) -> tuple[events.Event, PubAck]:
    """Publish ``data`` as a new Deadlift event on ``subject``, durably.

    The event's id (random unless given) is its ``Nats-Msg-Id``: publishing the
    same id again within the duplicate window is dropped (``ack.duplicate``).

    Raises:
        ConfigError: the subject or an attribute cannot travel on NATS.
        EventEncodeError: ``data`` is not msgpack-encodable.
        PermissionDeniedError: the server refused the subject.
        DeadliftError: no stream captures the subject.
    """
    event = events.new_event(data, source=source, type=type, id=id)
    headers, body = events.encode(event)
    ack = await publisher.publish(subject, body, headers, msg_id=event.id)
    return event, ack
