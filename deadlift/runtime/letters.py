"""Settling a delivered message, and dead-lettering an event that has failed for good."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from deadlift.bus import dlq
from deadlift.errors import StepError
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime.context import StepContext
from deadlift.wire import events

log = logging.getLogger("deadlift.worker")


async def settle(action: Awaitable[Any], what: str) -> None:
    """Ack/nak/term/in_progress without letting a lost connection crash the step.

    If the server never hears it, the event is redelivered after ack_wait and
    its outputs are deduplicated: nothing is lost.
    """
    try:
        await action
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        log.warning("%s failed (%s); the event will be redelivered", what, exc)


async def dead_letter(
    context: StepContext,
    where: tuple[Workflow, Step, str, str],
    msg: Msg,
    headers: dict[str, str] | None,
    event: events.Event | None,
    attempt: int,
    error: StepError,
) -> bool:
    """Store the event as a dead letter and term it; False (nak'd) when it could not be stored.

    ``where`` is the workflow, the step, the module's sha256 and the consumer.
    """
    workflow, step, module, consumer = where
    meta = msg.metadata
    try:
        await dlq.record(
            context.publisher,
            org=workflow.org,
            workflow=workflow.name,
            step=step.name,
            module=module,
            subject=msg.subject,
            headers=headers,
            body=msg.data,
            stream=meta.stream or "",
            seq=meta.sequence.stream if meta.sequence else 0,
            attempts=attempt,
            kind=error.kind,
            error=str(error),
            # A letter over max_payload keeps the event by reference (opened on use).
            store=dlq.ObjectBodies(context.js, replicas=context.settings.stream_replicas),
            # The org's first dead letter creates the stream (none until one is needed).
            create_stream=functools.partial(dlq.ensure_stream, context.js, context.settings),
        )
    except Exception as exc:  # never lose it: let it come back
        log.error("dead-lettering failed for %s (%s); will retry", consumer, exc)
        await settle(msg.nak(delay=1.0), "nak")
        return False
    await settle(msg.term(), "term")
    log.warning(
        "event %s dead-lettered at %s after %d attempt(s): [%s] %s",
        event.id if event else "?",
        consumer,
        attempt,
        error.kind,
        error,
    )
    return True
